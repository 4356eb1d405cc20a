"""A tiny but real Qwen2.5-VL checkpoint for tests, CI and CPU smoke runs.

The checkpoint is a genuine ``Qwen2_5_VLForConditionalGeneration`` whose config keeps every structural feature of
the released models (14 px patches, temporal patch 2, 2x2 spatial merge, mRoPE sections, windowed vision attention
with interleaved full-attention blocks, the Qwen special tokens and chat template) but with widths and depths shrunk
so it has under a million parameters. Weights are random (fixed seed), the byte-level BPE tokenizer is trained here
on a small embedded corpus, and everything is written with ``save_pretrained``. Downstream code therefore loads it
with ``from_pretrained`` exactly like ``Qwen/Qwen2.5-VL-3B-Instruct``: there is no mock anywhere.

Feeding already-sampled frames (transformers 5.x)::

    processor = AutoProcessor.from_pretrained(path)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "..."}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    inputs = processor(
        text=[text],
        videos=[frames],  # uint8 (T, H, W, 3); T even
        video_metadata=[{"fps": sample_fps, "total_num_frames": T, "frames_indices": list(range(T))}],
        do_sample_frames=False,
        return_tensors="pt",
    )
    model(**inputs)  # includes mm_token_type_ids and second_per_grid_ts (= 2 / sample_fps)

A bare ``fps=`` kwarg is ignored when the processor does not sample frames itself; without ``video_metadata`` the
timestamps silently assume 24 fps.

Nothing here runs at import time; transformers, tokenizers and torch are imported inside the functions so that
importing :mod:`opsvlm.testing.tiny` stays cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The operations task's label names (OpenPack's spelling), so the tokenizer learns merges for them.
from opsvlm.tasks.operations.labels import LABEL_NAMES

__all__ = [
    "CACHE_ENV_VAR",
    "MARKER_FILE",
    "QWEN_NONSPECIAL_ADDED_TOKENS",
    "QWEN_SPECIAL_TOKENS",
    "TINY_MODEL_ALIAS",
    "TINY_MODEL_VERSION",
    "TinyQwen25VLSpec",
    "build_config",
    "build_processor",
    "build_tiny_qwen25vl",
    "build_tokenizer",
    "count_parameters",
    "default_cache_dir",
    "ensure_tiny_model",
    "is_complete",
    "resolve_model_source",
    "tiny_model_dirname",
    "tokenizer_corpus",
]

# Bump whenever the builder's output changes (corpus, spec defaults, file layout) so cached copies are rebuilt.
TINY_MODEL_VERSION = 1
TINY_MODEL_ALIAS = "tiny"
# Written last into a finished checkpoint; its presence is what makes a cached directory count as complete.
MARKER_FILE = "opsvlm_tiny.json"
CACHE_ENV_VAR = "OPSVLM_CACHE_DIR"

# The Qwen2/Qwen2.5 added tokens in the released order. The first 14 are special (never split, skipped on decode);
# the rest are added but not special, exactly as in the Qwen2.5-VL tokenizer_config.json.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
QWEN_NONSPECIAL_ADDED_TOKENS: tuple[str, ...] = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)

# The processor chat template shipped with Qwen2-VL / Qwen2.5-VL (chat_template.json), verbatim.
QWEN25VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_ENGLISH_CORPUS = """\
You are a helpful assistant. You watch short video clips of a worker at a packing station and describe the work.
The worker picks items from a shelf, relocates the item label, assembles a box, inserts the items into the box,
closes the box, attaches the box label, scans the label, fills out the order form, attaches the shipping label
and finally puts the finished box on the back table. Each of these steps is called an operation.
Identify the current operation in the clip. Answer with a JSON object and nothing else.
What is the operation being performed, when does it start and when does it end? Which operation comes next?
Give the start and end times in seconds relative to the start of the clip. If no operation is visible, answer Null.
The clip is sampled at two frames per second. The frames are in order and the first frame is at time zero.
A good answer is short, exact and valid JSON. A bad answer repeats the question, invents labels or adds prose.
The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore. It was a bright cold day in
April, and the clocks were striking thirteen. In the beginning there was the word, and the word was short.
Warehouse work is repetitive but not identical: hands move quickly, boxes differ in size, and labels are small.
The camera looks down at the table from above. Sometimes the worker leaves the table and the view is empty.
Please read the instructions carefully. The model should predict the operation, the start time, the end time and
the next operation. The system, the user and the assistant take turns in the conversation. Thank you very much.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 15 20 25 30 45 60 90 100 120 0.5 1.5 2.25 3.75 12.0 59.9 -1 +1 1e-3 50%.
Punctuation: { } [ ] ( ) : ; , . ! ? " ' - _ / \\ | @ # $ % ^ & * + = < > ~ ` and new lines.
Yes. No. True. False. None. null. true. false. OK. Error: invalid JSON. The answer was wrong; try again.
"""


def _words(spec: str) -> tuple[str, ...]:
    """Split a ``|``-separated word list (kept as one string so formatting stays compact)."""
    return tuple(spec.split("|"))


# A small bank of frequent English words; sentences built from it give the BPE enough repeated words to learn
# ~1k merges without shipping a large text file.
_SUBJECTS = _words(
    "the worker|a person|the operator|she|he|they|we|the model|the camera|someone|the assistant|the user|"
    "the team|my friend|the system|this video|the manager|our robot"
)
_VERBS = _words(
    "picks up|puts down|moves|opens|closes|holds|scans|reads|writes|takes|gives|finds|checks|counts|"
    "places|carries|turns|pushes|pulls|watches|describes|labels|prints|folds|tapes|wraps|sorts|lifts|"
    "drops|fills|signs|starts|ends|predicts|answers|explains|learns|knows|wants|needs|sees|looks at|"
    "thinks about|works on"
)
_OBJECTS = _words(
    "the box|a small box|the large box|an item|the items|the label|a new label|the order form|"
    "the shipping label|the scanner|the tape|the table|the back table|the shelf|a pen|the paper|"
    "the answer|the question|the next step|the operation|the video|the frame|the clip|the time|the result|"
    "a list|the number|the package|the product|the bag|the cart|the screen"
)
_ADVERBIALS = _words(
    "quickly|slowly|carefully|again|at once|every day|in the morning|after lunch|right now|"
    "with both hands|with one hand|on the left|on the right|in the middle|near the edge|very well|"
    "before the end|after the start|for a few seconds|for about a minute|without a word|as usual|"
    "because it is late|because the box is full|while the camera is recording|when the order arrives"
)
_CONNECTIVES = _words("Then|First|Next|After that|Finally|Meanwhile|However|Later|Now|Also")


def _synthetic_english(rng: random.Random, n: int) -> list[str]:
    """Generate simple English sentences from the word bank (deterministic for a given ``rng``)."""
    lines = []
    for _ in range(n):
        sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ADVERBIALS)}."
        if rng.random() < 0.4:
            sentence = f"{rng.choice(_CONNECTIVES)}, {sentence}"
        lines.append(sentence[0].upper() + sentence[1:])
    return lines


def _synthetic_json_lines(rng: random.Random, n: int) -> list[str]:
    """Generate answer-shaped JSON lines so the tokenizer learns the keys, quotes and number formats."""
    lines = []
    for _ in range(n):
        op, nxt = rng.choice(LABEL_NAMES), rng.choice(LABEL_NAMES)
        start = round(rng.uniform(0, 30), rng.choice((0, 1, 2)))
        end = round(start + rng.uniform(0.5, 30), rng.choice((0, 1, 2)))
        record = {"operation": op, "start_s": start, "end_s": end, "next_operation": nxt}
        # Alternate compact and spaced separators: models emit both and both must tokenize to known merges.
        if rng.random() < 0.5:
            lines.append(json.dumps(record))
        else:
            lines.append(json.dumps(record, separators=(",", ":")))
    return lines


def tokenizer_corpus() -> list[str]:
    """Return the deterministic text the tiny tokenizer is trained on."""
    rng = random.Random(1234)
    corpus = [line for line in _ENGLISH_CORPUS.splitlines() if line]
    # Repeat the hand-written text: BPE only merges pairs seen at least min_frequency times.
    corpus = corpus * 3
    # Chat turns start with the bare role name right after <|im_start|>, so teach those words without a space.
    corpus += [f"{role}\nHello world. {line}" for role in ("system", "user", "assistant") for line in corpus[:10]]
    corpus += [f"The operation is {name}. Next operation: {name}." for name in LABEL_NAMES]
    corpus += _synthetic_english(rng, 3000)
    corpus += _synthetic_json_lines(rng, 400)
    return corpus


@dataclass(frozen=True)
class TinyQwen25VLSpec:
    """Sizes of the tiny checkpoint. Structural constants (patch 14, temporal patch 2, merge 2) are not knobs.

    Attributes:
        text_hidden_size: Width of the language model; also the vision merger's output width.
        text_num_layers: Decoder layers.
        text_num_heads: Query heads; ``text_hidden_size / text_num_heads`` is the head dim.
        text_num_kv_heads: Key/value heads (grouped-query attention like the released models).
        text_intermediate_size: SwiGLU width of the decoder MLP.
        mrope_section: Rotary dims for (temporal, height, width); must sum to head_dim / 2. The default keeps the
            released models' 16:24:24 ratio.
        vision_depth: Vision blocks.
        vision_hidden_size: Width of the vision tower.
        vision_num_heads: Vision attention heads.
        vision_intermediate_size: SwiGLU width of the vision MLP.
        fullatt_block_indexes: Vision blocks with full attention; the others use window attention. The released
            models make the last block of every group of 8 full; with depth 4 we make every second one full.
        window_size: Vision attention window in pixels (112 as released: 4x4 merged tokens).
        tokens_per_second: mRoPE temporal positions per second of video (2 as in Qwen2.5-VL-3B/7B).
        bpe_vocab_size: Target size of the trained byte-level BPE vocabulary, before the Qwen added tokens.
        image_min_pixels: Image processor lower pixel bound. 28*28 (one merged token) so small images are not
            upscaled.
        image_max_pixels: Image processor upper pixel bound.
        video_min_pixels: Video processor per-frame lower pixel bound. The transformers default (128*28*28) would
            silently upscale small frames, hence the explicit value.
        video_max_pixels: Video processor per-frame upper pixel bound (448x448 by default).
    """

    text_hidden_size: int = 128
    text_num_layers: int = 2
    text_num_heads: int = 4
    text_num_kv_heads: int = 2
    text_intermediate_size: int = 256
    mrope_section: tuple[int, int, int] = (4, 6, 6)
    vision_depth: int = 4
    vision_hidden_size: int = 64
    vision_num_heads: int = 4
    vision_intermediate_size: int = 128
    fullatt_block_indexes: tuple[int, ...] = (1, 3)
    window_size: int = 112
    tokens_per_second: int = 2
    bpe_vocab_size: int = 1024
    image_min_pixels: int = 28 * 28
    image_max_pixels: int = 28 * 28 * 1280
    video_min_pixels: int = 28 * 28
    video_max_pixels: int = 448 * 448
    # Fixed by the architecture; kept as fields only so they are recorded in the marker file.
    patch_size: int = field(default=14, init=False)
    temporal_patch_size: int = field(default=2, init=False)
    spatial_merge_size: int = field(default=2, init=False)

    def __post_init__(self) -> None:
        head_dim, rem = divmod(self.text_hidden_size, self.text_num_heads)
        if rem:
            raise ValueError(f"text_hidden_size {self.text_hidden_size} not divisible by {self.text_num_heads} heads")
        if sum(self.mrope_section) * 2 != head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim/2 = {head_dim // 2}")
        if self.text_num_heads % self.text_num_kv_heads:
            raise ValueError("text_num_heads must be a multiple of text_num_kv_heads")
        if not self.fullatt_block_indexes or any(not 0 <= i < self.vision_depth for i in self.fullatt_block_indexes):
            raise ValueError(f"fullatt_block_indexes {self.fullatt_block_indexes} must be non-empty and < depth")
        if len(set(self.fullatt_block_indexes)) == self.vision_depth:
            raise ValueError("at least one vision block must use window attention")

    def digest(self) -> str:
        """Short stable hash of the spec, used in cache directory names."""
        payload = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:10]


def _train_bpe(spec: TinyQwen25VLSpec) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE with Qwen2's normalizer and pre-tokenizer; return its vocab and merges."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    # Same pipeline as Qwen2Tokenizer builds around its BPE, so the merges learned here are the ones it applies.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.bpe_vocab_size,
        min_frequency=2,
        # All 256 byte symbols, so any UTF-8 text (and any model output) stays encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def build_tokenizer(spec: TinyQwen25VLSpec | None = None) -> Any:
    """Train the tiny byte-level BPE and wrap it in the tokenizer class Qwen2.5-VL uses (``Qwen2Tokenizer``).

    The Qwen added tokens follow the trained vocabulary in the released order, so ``<|endoftext|>`` is the first id
    after the BPE vocab, as in the real tokenizer.

    Args:
        spec: Sizes; defaults to :class:`TinyQwen25VLSpec`.

    Returns:
        A ``transformers.Qwen2Tokenizer`` (tokenizers-backed fast tokenizer).
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    spec = spec or TinyQwen25VLSpec()
    vocab, merges = _train_bpe(spec)
    n_bpe = len(vocab)
    added = QWEN_SPECIAL_TOKENS + QWEN_NONSPECIAL_ADDED_TOKENS
    # Reserve the added tokens' ids in the vocab itself: Qwen2Tokenizer.__init__ registers eos/pad as soon as it is
    # built, which would otherwise hand them the first free ids and break the released id layout.
    vocab.update({token: n_bpe + i for i, token in enumerate(added)})
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        # Qwen2.5-VL-Instruct's tokenizer_config: eos is <|im_end|> (end of a chat turn), pad is <|endoftext|>,
        # no bos and no unk (byte-level BPE can encode anything).
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    tokenizer.add_special_tokens(
        {"extra_special_tokens": [AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS[1:]]}
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_NONSPECIAL_ADDED_TOKENS])
    ids = tokenizer.convert_tokens_to_ids(list(added))
    if ids != list(range(n_bpe, n_bpe + len(added))) or len(tokenizer) != n_bpe + len(added):
        raise RuntimeError(f"Qwen added tokens got ids {ids} (len {len(tokenizer)}); expected them right after {n_bpe}")
    return tokenizer


def build_config(tokenizer: Any, spec: TinyQwen25VLSpec | None = None) -> Any:
    """Build the shrunken ``Qwen2_5_VLConfig`` with token ids taken from ``tokenizer``.

    Args:
        tokenizer: The tokenizer from :func:`build_tokenizer`.
        spec: Sizes; defaults to :class:`TinyQwen25VLSpec`.

    Returns:
        A ``transformers.Qwen2_5_VLConfig``.
    """
    from transformers import Qwen2_5_VLConfig

    spec = spec or TinyQwen25VLSpec()
    tid = tokenizer.convert_tokens_to_ids
    text_config = {
        # Exactly the tokenizer's length: random weights must never emit an id the tokenizer cannot decode.
        "vocab_size": len(tokenizer),
        "hidden_size": spec.text_hidden_size,
        "intermediate_size": spec.text_intermediate_size,
        "num_hidden_layers": spec.text_num_layers,
        "num_attention_heads": spec.text_num_heads,
        "num_key_value_heads": spec.text_num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "use_sliding_window": False,
        "sliding_window": 32768,
        "max_window_layers": spec.text_num_layers,
        "attention_dropout": 0.0,
        # transformers 5 renamed rope_scaling to rope_parameters; "mrope" is normalized to the default rope type
        # with mrope_section kept, which is what the released configs load as.
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": list(spec.mrope_section),
        },
        "bos_token_id": tid("<|endoftext|>"),
        "eos_token_id": tid("<|im_end|>"),
        "pad_token_id": tid("<|endoftext|>"),
    }
    vision_config = {
        "depth": spec.vision_depth,
        "hidden_size": spec.vision_hidden_size,
        "hidden_act": "silu",
        "intermediate_size": spec.vision_intermediate_size,
        "num_heads": spec.vision_num_heads,
        "in_channels": 3,
        "patch_size": spec.patch_size,
        "spatial_merge_size": spec.spatial_merge_size,
        "temporal_patch_size": spec.temporal_patch_size,
        "tokens_per_second": spec.tokens_per_second,
        "window_size": spec.window_size,
        "out_hidden_size": spec.text_hidden_size,
        "fullatt_block_indexes": list(spec.fullatt_block_indexes),
    }
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=tid("<|image_pad|>"),
        video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"),
        vision_end_token_id=tid("<|vision_end|>"),
        # Like Qwen2.5-VL-3B: tying keeps the parameter count dominated by the transformer, not the embeddings.
        tie_word_embeddings=True,
    )


def build_processor(tokenizer: Any, spec: TinyQwen25VLSpec | None = None) -> Any:
    """Assemble the ``Qwen2_5_VLProcessor`` with explicit pixel limits and the Qwen2.5-VL chat template.

    Args:
        tokenizer: The tokenizer from :func:`build_tokenizer`.
        spec: Sizes and pixel limits; defaults to :class:`TinyQwen25VLSpec`.

    Returns:
        A ``transformers.Qwen2_5_VLProcessor``.
    """
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    spec = spec or TinyQwen25VLSpec()
    geometry = {
        "patch_size": spec.patch_size,
        "temporal_patch_size": spec.temporal_patch_size,
        "merge_size": spec.spatial_merge_size,
    }
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": spec.image_min_pixels, "longest_edge": spec.image_max_pixels}, **geometry
    )
    video_processor = Qwen2VLVideoProcessor(
        size={"shortest_edge": spec.video_min_pixels, "longest_edge": spec.video_max_pixels},
        # Callers hand over frames they already sampled (with their own timestamps); the processor must not resample.
        do_sample_frames=False,
        # Explicit False: the per-frame cap would make a frame's token count depend on the clip length.
        cap_pixels_per_frame=False,
        **geometry,
    )
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN25VL_CHAT_TEMPLATE,
    )


def count_parameters(model: Any) -> int:
    """Count unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def build_tiny_qwen25vl(
    out_dir: str | os.PathLike[str], *, seed: int = 0, spec: TinyQwen25VLSpec | None = None
) -> Path:
    """Write a tiny, randomly initialised Qwen2.5-VL checkpoint directory.

    The directory holds config, generation config, safetensors weights, tokenizer and processor files, all written
    with ``save_pretrained``; load it with ``AutoProcessor.from_pretrained`` and
    ``Qwen2_5_VLForConditionalGeneration.from_pretrained`` (or ``AutoModelForImageTextToText``). The same seed and
    spec give byte-identical weights.

    Args:
        out_dir: Target directory; created if missing, must be empty if it exists.
        seed: Seed for the weight initialisation.
        spec: Sizes; defaults to :class:`TinyQwen25VLSpec`.

    Returns:
        ``out_dir`` as a resolved ``Path``.

    Raises:
        FileExistsError: If ``out_dir`` exists and is not empty.
    """
    import torch
    import transformers
    from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

    spec = spec or TinyQwen25VLSpec()
    out = Path(out_dir).resolve()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(spec)
    config = build_config(tokenizer, spec)
    # fork_rng: seed locally without disturbing the caller's global torch RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.eval()
    eos_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    # Released generation_config stops on both <|im_end|> and <|endoftext|>; greedy here so outputs are reproducible.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out)
    build_processor(tokenizer, spec).save_pretrained(out)

    marker = {
        "builder": "opsvlm.testing.tiny.build_tiny_qwen25vl",
        "version": TINY_MODEL_VERSION,
        "seed": seed,
        "spec": asdict(spec),
        "num_parameters": count_parameters(model),
        "vocab_size": len(tokenizer),
        "transformers_version": transformers.__version__,
    }
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    return out


def tiny_model_dirname(*, seed: int = 0, spec: TinyQwen25VLSpec | None = None) -> str:
    """Version-stamped directory name for a cached tiny checkpoint.

    The transformers version is part of the name because checkpoint files written by one major/minor release are
    not guaranteed to load identically in another.
    """
    import transformers

    spec = spec or TinyQwen25VLSpec()
    tf = transformers.__version__.replace("+", "_")
    return f"tiny-qwen2.5-vl-v{TINY_MODEL_VERSION}-seed{seed}-{spec.digest()}-tf{tf}"


def default_cache_dir() -> Path:
    """``$OPSVLM_CACHE_DIR`` if set, else ``~/.cache/opsvlm``."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env) if env else Path.home() / ".cache" / "opsvlm"


def is_complete(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a finished tiny checkpoint (marker written last, weights and processor present)."""
    p = Path(path)
    needed = (MARKER_FILE, "config.json", "model.safetensors", "tokenizer.json", "processor_config.json")
    return all((p / name).is_file() for name in needed)


def ensure_tiny_model(
    cache_dir: str | os.PathLike[str] | None = None, *, seed: int = 0, spec: TinyQwen25VLSpec | None = None
) -> Path:
    """Return a cached tiny checkpoint, building it once per cache directory.

    Concurrent callers (Ray Train workers, several test processes) serialise on an exclusive ``flock`` next to the
    checkpoint: the first one builds it into a temporary sibling directory and renames it into place, the others wait
    and then find it complete. A directory without the marker file (an interrupted build or copy) is moved aside and
    rebuilt. The lock is released by the kernel if its holder dies, so a killed builder never blocks the next one.

    Args:
        cache_dir: Parent directory for cached checkpoints; defaults to :func:`default_cache_dir`.
        seed: Weight seed.
        spec: Sizes; defaults to :class:`TinyQwen25VLSpec`.

    Returns:
        Path of the complete checkpoint directory.

    Raises:
        RuntimeError: The build finished but the directory is still incomplete (never expected; says what is missing).
    """
    spec = spec or TinyQwen25VLSpec()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / tiny_model_dirname(seed=seed, spec=spec)
    if is_complete(final):  # the common case: no lock needed to read a finished checkpoint
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / f".{final.name}.lock"):
        if is_complete(final):  # another process built it while we waited
            return final
        if final.exists():
            # Leftovers of an interrupted copy: move aside atomically, then delete.
            stale = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".stale", dir=root))
            os.rename(final, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
        try:
            build_tiny_qwen25vl(tmp, seed=seed, spec=spec)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if not is_complete(final):
        present = sorted(p.name for p in final.iterdir()) if final.is_dir() else []
        raise RuntimeError(f"tiny checkpoint {final} is incomplete after building it (files: {present})")
    return final


@contextlib.contextmanager
def _exclusive_lock(path: Path):
    """An exclusive advisory lock on ``path`` (created if missing), held for the ``with`` block."""
    import fcntl

    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def resolve_model_source(model: str, *, cache_dir: str | os.PathLike[str] | None = None, seed: int = 0) -> str:
    """Map a config's ``model`` value to something ``from_pretrained`` accepts.

    ``"tiny"`` resolves to the cached tiny checkpoint (built on first use); anything else (a hub id such as
    ``Qwen/Qwen2.5-VL-3B-Instruct`` or a local directory) is returned unchanged.

    Args:
        model: ``"tiny"``, a hub id or a directory.
        cache_dir: Where the tiny checkpoint is cached.
        seed: Weight seed of the tiny checkpoint.

    Returns:
        A hub id or a local directory path.
    """
    if model == TINY_MODEL_ALIAS:
        return str(ensure_tiny_model(cache_dir, seed=seed))
    return model
