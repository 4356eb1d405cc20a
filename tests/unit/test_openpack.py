import csv
import datetime as dt

import pytest

from opsvlm.tasks.operations import ALL_LABELS, LABEL_NAMES, NULL, OPERATIONS, operation_by_id, operation_by_name
from opsvlm.tasks.operations.data.openpack import (
    AnnotationError,
    discover_sessions,
    frame_name,
    frame_time_from_name,
    list_frames,
    read_operations_csv,
    write_operations_csv,
)


def test_label_space_is_openpacks_ten_operations_plus_null():
    assert [op.id for op in OPERATIONS] == [100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]
    assert NULL.id == 8100 and LABEL_NAMES[-1] == "Null" and len(ALL_LABELS) == 11
    assert operation_by_name("Fill out Order").id == 1000
    with pytest.raises(KeyError, match="unknown OpenPack operation id 123"):
        operation_by_id(123)


def test_real_sample_session_loads_exactly(sample_root):
    csv_path = sample_root / "U0209/annotation/openpack-operations/S0500.csv"
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    timeline = read_operations_csv(csv_path)
    assert (timeline.subject, timeline.session) == ("U0209", "S0500")
    assert len(timeline.segments) == len(rows) == 193
    # every row accounted for: same uuid, id and times (ms precision), in order
    origin = dt.datetime.fromisoformat(rows[0]["start"])
    assert timeline.origin == origin
    for row, seg in zip(rows, timeline.segments, strict=True):
        assert seg.uuid == row["uuid"] and seg.op_id == int(row["id"]) and seg.name == row["operation"]
        assert seg.box == int(row["box"])
        assert seg.start_s == pytest.approx((dt.datetime.fromisoformat(row["start"]) - origin).total_seconds())
        assert seg.end_s == pytest.approx((dt.datetime.fromisoformat(row["end"]) - origin).total_seconds())
    assert timeline.duration_s == pytest.approx(1406.77, abs=0.01)  # 14:25:22.143 -> 14:48:48.913
    assert {seg.op_id for seg in timeline.segments} == {op.id for op in OPERATIONS}


def test_write_then_read_round_trips(tmp_path, sample_root):
    timeline = read_operations_csv(sample_root / "U0209/annotation/openpack-operations/S0500.csv")
    written = write_operations_csv(tmp_path / "S0500.csv", timeline)
    again = read_operations_csv(written)
    assert again.segments == timeline.segments and again.origin == timeline.origin


HEADER = "uuid,user,session,box,id,operation,start,end,actions\n"
GOOD = "op:1,U1,S1,1,100,Picking,2022-03-29 14:25:22.143000+09:00,2022-03-29 14:25:30.304000+09:00,\n"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("uuid,user,session,box,id,operation,start\n", "missing column"),
        (HEADER, "no annotation rows"),
        (HEADER + GOOD.replace("2022-03-29 14:25:30.304000+09:00", "yesterday"), r":2: field 'end' is not an ISO"),
        (HEADER + GOOD.replace(",100,", ",150,"), r":2: field 'id' is not an OpenPack operation id"),
        (HEADER + GOOD.replace("Picking", "Close Box"), "but field 'operation' says 'Close Box'"),
        (HEADER + GOOD.replace("+09:00,2022", "+09:00,2021"), "is not after start"),
        (HEADER + GOOD + GOOD.replace("op:1", "op:2"), r":3: row overlaps the previous one"),
        (HEADER + GOOD.replace("+09:00,2022", ",2022", 1), "has no UTC offset"),
        (HEADER + GOOD + GOOD.replace(",U1,", ",U2,"), "mix users"),
    ],
)
def test_bad_annotation_is_an_error_naming_file_and_line(tmp_path, body, message):
    path = tmp_path / "S1.csv"
    path.write_text(body)
    with pytest.raises(AnnotationError, match=message) as info:
        read_operations_csv(path)
    assert str(path) in str(info.value)


def test_frame_names_parse_and_round_trip(sample_root):
    frames = list_frames(sample_root / "U0209/kinect/color-masked/frames/S0500")
    assert len(frames) == 15
    times = [frame_time_from_name(p) for p in frames]
    assert times == sorted(times) and times[0] == dt.datetime(2022, 3, 29, 14, 25, 11, 30000)
    # ~15 fps
    assert (times[-1] - times[0]).total_seconds() == pytest.approx(14 / 15, abs=0.05)
    rebuilt = frame_name(times[3])
    assert frames[3].as_posix().endswith(rebuilt)
    with pytest.raises(ValueError, match="not YYYYMMDD_HHMMSS_mmm"):
        frame_time_from_name("frame_0001.jpg")


def test_discover_finds_the_sample_with_jpeg_frames(sample_root):
    (source,) = discover_sessions(sample_root)
    assert (source.subject, source.session, source.media_kind) == ("U0209", "S0500", "frames")
    with pytest.raises(FileNotFoundError):
        discover_sessions(sample_root / "nope")
