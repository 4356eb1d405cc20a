import av
import numpy as np

from opsvlm.video.encode import write_video


def test_write_video_writes_every_frame_as_h264(tmp_path):
    frames = [np.full((32, 48, 3), 20 * i, np.uint8) for i in range(5)]
    path = tmp_path / "x" / "clip.mp4"
    assert write_video(path, frames, fps=5) == 5
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        decoded = list(container.decode(stream))
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
    assert len(decoded) == 5 and (decoded[0].height, decoded[0].width) == (32, 48)
