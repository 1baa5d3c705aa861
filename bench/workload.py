"""Deterministic generator of ML-style checkpoint directories for the benchmark.

Every byte is a pure function of (variant, scale, step, file), so two runs, or two
machines, write the same trees. Data is generated with ``random.Random(seed).randbytes``
plus ``bytes.translate`` and extended-slice interleaving (about 200 MB/s, no numpy).

Variants:

- ``lora``: a frozen base model in two real safetensors shards (the bulk of the bytes),
  a LoRA adapter (~3 %) and fp32 optimizer state (~6 %) that change every step, an
  unchanging ``tokenizer.json`` (~2 MB), append-only ``train.log`` and
  ``trainer_state.json``, and ``misc/`` with a few hundred 1-16 KiB files of which a
  handful change per step.
- ``shifted``: like ``lora``, but the base shards' JSON headers grow every step, so every
  tensor moves within its file while the tensor bytes stay the same.
- ``smallfiles``: 10,000 files of 1-8 KiB (~45 MiB at scale 512; the count scales with
  ``scale``), about 3 % of them change per step.
- ``full``: like ``lora``, but every base tensor changes every step (full fine-tune).

``make_step(dir, variant, step, scale, in_place)`` writes step N. In place rewrites only
the files whose bytes change (others keep inode and mtime; the log is appended to). Not in
place writes a fresh ``dir/checkpoint-N`` in which every file is new.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import random
import shutil
import struct
import sys
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

__all__ = ["VARIANTS", "FileSpec", "StepResult", "files_for", "make_step"]

VARIANTS = ("lora", "shifted", "smallfiles", "full")
MiB = 1024 * 1024

N_LAYERS = 8
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
ADAPTER_FRACTION = 0.03
OPTIMIZER_FRACTION = 0.06
TOKENIZER_BYTES = 2_000_000
MISC_FILES = 300
MISC_CHANGES_PER_STEP = 5
SMALLFILES_AT_512 = 10_000
SMALLFILES_CHANGE_FRACTION = 0.03
HEADER_GROWTH = 40  # bytes the ``shifted`` safetensors headers grow by per step
LOG_LINES_PER_STEP = 50
HISTORY_ENTRIES_PER_STEP = 10


# ---------------------------------------------------------------------------
# Byte generators


def _high_byte_table(weights: dict[int, int], signed: bool) -> bytes:
    """A translate table mapping a uniform byte to a sign + 7-bit exponent byte."""
    items = sorted(weights.items())
    total = sum(w for _, w in items)
    span = 128 if signed else 256
    table = bytearray(256)
    for i in range(256):
        u = (i % span) / span
        acc = 0.0
        chosen = items[-1][0]
        for value, weight in items:
            acc += weight / total
            if u < acc:
                chosen = value
                break
        table[i] = chosen | (0x80 if signed and i >= 128 else 0)
    return bytes(table)


# bf16 weights around 1e-2..1e-3: exponent 117..123, top seven bits 56..63 (plus sign).
_BF16_HIGH = _high_byte_table({56: 3, 57: 7, 58: 15, 59: 25, 60: 25, 61: 15, 62: 7, 63: 3}, True)
# fp32 Adam moments: small signed first moment, tiny positive second moment.
_FP32_EXP_AVG_HIGH = _high_byte_table({55: 10, 56: 30, 57: 40, 58: 20}, True)
_FP32_EXP_AVG_SQ_HIGH = _high_byte_table({48: 10, 49: 30, 50: 40, 51: 20}, False)


def _rng(*parts: object) -> random.Random:
    # A str seed is hashed with SHA-512: stable across processes and Python versions.
    return random.Random(":".join(str(p) for p in parts))


def bf16_bytes(rng: random.Random, n_values: int) -> bytearray:
    """Little-endian bf16 values: random low byte, narrow sign+exponent high byte."""
    out = bytearray(rng.randbytes(2 * n_values))
    out[1::2] = out[1::2].translate(_BF16_HIGH)
    return out


def fp32_bytes(rng: random.Random, n_values: int, high_table: bytes) -> bytearray:
    """Little-endian fp32 values: three random bytes, a narrow sign+exponent byte."""
    out = bytearray(rng.randbytes(4 * n_values))
    out[3::4] = out[3::4].translate(high_table)
    return out


_WORD_ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def _words(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choices(_WORD_ALPHABET, k=rng.randint(2, 9))) for _ in range(n)]


def _text_bytes(rng: random.Random, size: int) -> bytes:
    """Compressible text-like bytes of exactly ``size`` bytes."""
    vocab = _words(rng, 64)
    parts: list[str] = []
    length = 0
    while length < size:
        line = " ".join(rng.choices(vocab, k=12)) + "\n"
        parts.append(line)
        length += len(line)
    return "".join(parts).encode()[:size]


# ---------------------------------------------------------------------------
# File specifications

Data = bytes | bytearray
ContentFn = Callable[[int], Iterable[Data]]


@dataclass(frozen=True)
class FileSpec:
    """One file of a checkpoint.

    ``version(step)`` names the content at a step: the file's bytes at two steps are
    equal exactly when their versions are. ``content(step)`` yields the whole file.
    ``appended(step)``, for append-only files, yields what step adds to step - 1.
    """

    relpath: str
    version: Callable[[int], object]
    content: ContentFn
    appended: ContentFn | None = None


def _frozen(step: int) -> object:
    return 0


def _every_step(step: int) -> object:
    return step


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * (2 if self.dtype == "BF16" else 4)


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    ffn: int
    vocab: int
    rank: int
    base_shards: tuple[tuple[Tensor, ...], ...]
    adapter: tuple[Tensor, ...]
    optimizer_values: int


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, multiple * round(x / multiple))


def _layer_tensors(i: int, hidden: int, ffn: int) -> list[Tensor]:
    p = f"model.layers.{i}"
    return [
        Tensor(f"{p}.input_layernorm.weight", "BF16", (hidden,)),
        Tensor(f"{p}.self_attn.q_proj.weight", "BF16", (hidden, hidden)),
        Tensor(f"{p}.self_attn.k_proj.weight", "BF16", (hidden, hidden)),
        Tensor(f"{p}.self_attn.v_proj.weight", "BF16", (hidden, hidden)),
        Tensor(f"{p}.self_attn.o_proj.weight", "BF16", (hidden, hidden)),
        Tensor(f"{p}.post_attention_layernorm.weight", "BF16", (hidden,)),
        Tensor(f"{p}.mlp.gate_proj.weight", "BF16", (ffn, hidden)),
        Tensor(f"{p}.mlp.up_proj.weight", "BF16", (ffn, hidden)),
        Tensor(f"{p}.mlp.down_proj.weight", "BF16", (hidden, ffn)),
    ]


def _small_fixed_bytes() -> int:
    """Rough size of everything in ``lora`` that is not a tensor file."""
    return TOKENIZER_BYTES + MISC_FILES * 8704 + 400_000


@cache
def model_shape(scale: int) -> ModelShape:
    """Tensor layout for a total checkpoint size of about ``scale`` MiB."""
    total = scale * MiB
    adapter_bytes = ADAPTER_FRACTION * total
    optimizer_bytes = OPTIMIZER_FRACTION * total
    base_bytes = max(total - adapter_bytes - optimizer_bytes - _small_fixed_bytes(), 4 * MiB)
    # 8 layers of 4 h*h attention + 3 h*4h MLP matrices = 256 h^2 bytes; embeddings fill
    # the rest (vocab is the knob that makes the total come out close to ``scale``).
    hidden = _round_to(math.sqrt(base_bytes / 350), 64)
    ffn = 4 * hidden
    layers_bytes = N_LAYERS * 2 * (4 * hidden * hidden + 3 * ffn * hidden + 2 * hidden)
    vocab = _round_to(max(base_bytes - layers_bytes, 0) / (4 * hidden), 64)
    first = [Tensor("model.embed_tokens.weight", "BF16", (vocab, hidden))]
    second = [
        Tensor("model.norm.weight", "BF16", (hidden,)),
        Tensor("lm_head.weight", "BF16", (vocab, hidden)),
    ]
    for i in range(N_LAYERS):
        (first if i < N_LAYERS // 2 else second).extend(_layer_tensors(i, hidden, ffn))
    rank = max(1, round(adapter_bytes / (N_LAYERS * len(LORA_MODULES) * 2 * hidden * 2)))
    adapter: list[Tensor] = []
    for i in range(N_LAYERS):
        for module in LORA_MODULES:
            p = f"base_model.model.model.layers.{i}.self_attn.{module}"
            adapter.append(Tensor(f"{p}.lora_A.weight", "BF16", (rank, hidden)))
            adapter.append(Tensor(f"{p}.lora_B.weight", "BF16", (hidden, rank)))
    return ModelShape(
        hidden=hidden,
        ffn=ffn,
        vocab=vocab,
        rank=rank,
        base_shards=(tuple(first), tuple(second)),
        adapter=tuple(adapter),
        optimizer_values=int(optimizer_bytes / 4),
    )


def _safetensors(
    tensors: tuple[Tensor, ...],
    data_key: Callable[[Tensor], tuple[object, ...]],
    metadata: dict[str, str],
) -> Iterator[Data]:
    """A safetensors file: u64 LE header length, JSON header (space padded), data."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    yield struct.pack("<Q", len(raw)) + raw
    for t in tensors:
        yield bf16_bytes(_rng(*data_key(t)), math.prod(t.shape))


def _base_shard_spec(variant: str, scale: int, index: int) -> FileSpec:
    shape = model_shape(scale)
    tensors = shape.base_shards[index]
    name = f"model-{index + 1:05d}-of-{len(shape.base_shards):05d}.safetensors"
    tensors_change = variant == "full"
    header_changes = variant == "shifted"

    def data_key(step: int) -> Callable[[Tensor], tuple[object, ...]]:
        return lambda t: ("base", scale, t.name, step if tensors_change else 0)

    def metadata(step: int) -> dict[str, str]:
        meta = {"format": "pt"}
        if header_changes:
            meta["checkpoint_note"] = "s" * (HEADER_GROWTH * step)
        return meta

    def content(step: int) -> Iterable[Data]:
        return _safetensors(tensors, data_key(step), metadata(step))

    changes = tensors_change or header_changes
    return FileSpec(name, _every_step if changes else _frozen, content)


def _adapter_spec(scale: int) -> FileSpec:
    tensors = model_shape(scale).adapter

    def content(step: int) -> Iterable[Data]:
        return _safetensors(tensors, lambda t: ("adapter", scale, t.name, step), {"format": "pt"})

    return FileSpec("adapter_model.safetensors", _every_step, content)


def _optimizer_spec(scale: int) -> FileSpec:
    """A torch.save-like zip (stored, fixed timestamps) holding fp32 Adam moments."""
    shape = model_shape(scale)
    per_tensor = max(1, shape.optimizer_values // (2 * len(shape.adapter)))

    def content(step: int) -> Iterable[Data]:
        return [_optimizer_zip(scale, step, len(shape.adapter), per_tensor)]

    return FileSpec("optimizer.pt", _every_step, content)


def _optimizer_zip(scale: int, step: int, n_params: int, per_tensor: int) -> bytes:
    import io

    buf = io.BytesIO()
    state = {
        "state": {
            i: {"step": step, "exp_avg": 2 * i, "exp_avg_sq": 2 * i + 1} for i in range(n_params)
        },
        "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": list(range(n_params))}],
    }
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        _zip_write(zf, "archive/data.pkl", pickle.dumps(state, protocol=2))
        for i in range(2 * n_params):
            table = _FP32_EXP_AVG_HIGH if i % 2 == 0 else _FP32_EXP_AVG_SQ_HIGH
            data = fp32_bytes(_rng("optimizer", scale, i, step), per_tensor, table)
            _zip_write(zf, f"archive/data/{i}", bytes(data))
        _zip_write(zf, "archive/version", b"3\n")
    return buf.getvalue()


def _zip_write(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    zf.writestr(info, data)


@cache
def _tokenizer_json() -> bytes:
    rng = _rng("tokenizer")
    vocab: dict[str, int] = {}
    merges: list[str] = []
    size = 200
    while size < TOKENIZER_BYTES:
        token = "".join(rng.choices(_WORD_ALPHABET, k=rng.randint(2, 10)))
        if token in vocab:
            continue
        vocab[token] = len(vocab)
        merges.append(f"{token[:1]} {token[1:]}")
        size += 2 * len(token) + 16 + len(str(len(vocab)))
    doc = {"version": "1.0", "model": {"type": "BPE", "vocab": vocab, "merges": merges}}
    return json.dumps(doc, indent=1).encode()


def _log_lines(step: int) -> bytes:
    rng = _rng("log", step)
    lines = []
    for k in range(LOG_LINES_PER_STEP):
        global_step = step * LOG_LINES_PER_STEP + k
        loss = 2.5 * math.exp(-global_step / 5000) + rng.random() * 0.1
        lines.append(
            f"[rank0] step={global_step} loss={loss:.4f} grad_norm={rng.random() * 2:.4f} "
            f"lr={1e-4 * (1 - global_step / 1e6):.6e} tokens_per_s={rng.randint(9000, 11000)}\n"
        )
    return "".join(lines).encode()


def _train_log_spec() -> FileSpec:
    def content(step: int) -> Iterable[Data]:
        return [_log_lines(s) for s in range(step + 1)]

    return FileSpec("train.log", _every_step, content, appended=lambda step: [_log_lines(step)])


def _trainer_state(step: int) -> bytes:
    history = []
    for s in range(-20, step + 1):  # 20 "earlier" steps so the file has a realistic size
        rng = _rng("history", s)
        for k in range(HISTORY_ENTRIES_PER_STEP):
            history.append(
                {
                    "epoch": round((s + 20) * 0.01 + k * 0.001, 4),
                    "grad_norm": round(rng.random() * 2, 6),
                    "learning_rate": 1e-4,
                    "loss": round(1 + rng.random(), 4),
                    "step": (s + 20) * HISTORY_ENTRIES_PER_STEP + k,
                }
            )
    doc = {
        "best_metric": None,
        "epoch": round((step + 20) * 0.01, 4),
        "global_step": (step + 21) * HISTORY_ENTRIES_PER_STEP,
        "log_history": history,
        "train_batch_size": 8,
    }
    return json.dumps(doc, indent=2).encode()


def _small_files(
    prefix: str, n: int, sizes: tuple[int, int], changes_per_step: int, per_dir: int
) -> list[FileSpec]:
    """``n`` small files; ``changes_per_step`` of them get new bytes at every step >= 1."""

    @cache
    def changed_at(step: int) -> frozenset[int]:
        return frozenset(_rng(prefix, "changes", step).sample(range(n), changes_per_step))

    def version_of(i: int) -> Callable[[int], object]:
        def version(step: int) -> object:
            return next((s for s in range(step, 0, -1) if i in changed_at(s)), 0)

        return version

    def content_of(i: int, version: Callable[[int], object]) -> ContentFn:
        def content(step: int) -> Iterable[Data]:
            rng = _rng(prefix, i, version(step))
            size = rng.randint(*sizes)
            return [rng.randbytes(size) if i % 2 else _text_bytes(rng, size)]

        return content

    specs = []
    for i in range(n):
        ext = "bin" if i % 2 else "txt"
        relpath = f"{prefix}/d{i // per_dir:03d}/f{i:05d}.{ext}"
        version = version_of(i)
        specs.append(FileSpec(relpath, version, content_of(i, version)))
    return specs


def _constant(relpath: str, data: bytes) -> FileSpec:
    return FileSpec(relpath, _frozen, lambda step: [data])


def _config_json(scale: int) -> bytes:
    shape = model_shape(scale)
    doc = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": shape.hidden,
        "intermediate_size": shape.ffn,
        "num_hidden_layers": N_LAYERS,
        "vocab_size": shape.vocab,
        "torch_dtype": "bfloat16",
    }
    return json.dumps(doc, indent=2).encode()


def files_for(variant: str, scale: int) -> list[FileSpec]:
    """Every file of ``variant`` at ``scale`` MiB, in a fixed order."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    if variant == "smallfiles":
        n = max(100, round(SMALLFILES_AT_512 * scale / 512))
        changes = max(1, round(n * SMALLFILES_CHANGE_FRACTION))
        return _small_files("data", n, (1024, 8192), changes, per_dir=100)
    shape = model_shape(scale)
    specs = [_base_shard_spec(variant, scale, i) for i in range(len(shape.base_shards))]
    specs += [
        _constant("config.json", _config_json(scale)),
        _constant("adapter_config.json", json.dumps({"r": shape.rank}).encode()),
        _adapter_spec(scale),
        _optimizer_spec(scale),
        _constant("tokenizer.json", _tokenizer_json()),
        _train_log_spec(),
        FileSpec("trainer_state.json", _every_step, lambda step: [_trainer_state(step)]),
    ]
    specs += _small_files("misc", MISC_FILES, (1024, 16384), MISC_CHANGES_PER_STEP, per_dir=100)
    return specs


# ---------------------------------------------------------------------------
# Writing steps


@dataclass(frozen=True)
class StepResult:
    path: Path
    files_written: int
    bytes_written: int


def _write(path: Path, chunks: Iterable[Data], mode: str = "wb") -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, mode) as f:
        for chunk in chunks:
            f.write(chunk)
            n += len(chunk)
    return n


def _is_empty_dir(path: Path) -> bool:
    return not path.exists() or not any(path.iterdir())


def make_step(
    dir: str | os.PathLike[str], variant: str, step: int, scale: int = 512, in_place: bool = True
) -> StepResult:
    """Write step ``step`` of ``variant`` at ``scale`` MiB.

    In place: ``dir`` is the checkpoint. If it is missing or empty (or ``step`` is 0) every
    file is written; otherwise ``dir`` must hold step - 1, and only files whose bytes
    change are written (append-only files are appended to).
    Not in place: ``dir/checkpoint-{step}`` is (re)created with every file new.
    """
    root = Path(dir)
    specs = files_for(variant, scale)
    if not in_place:
        target = root / f"checkpoint-{step}"
        if target.exists():
            shutil.rmtree(target)
        return _write_all(target, specs, step)
    if step == 0 or _is_empty_dir(root):
        return _write_all(root, specs, step)
    files = 0
    nbytes = 0
    for spec in specs:
        if spec.version(step) == spec.version(step - 1):
            continue
        if spec.appended is not None:
            nbytes += _write(root / spec.relpath, spec.appended(step), "ab")
        else:
            nbytes += _write(root / spec.relpath, spec.content(step))
        files += 1
    return StepResult(root, files, nbytes)


def _write_all(root: Path, specs: list[FileSpec], step: int) -> StepResult:
    root.mkdir(parents=True, exist_ok=True)
    nbytes = sum(_write(root / spec.relpath, spec.content(step)) for spec in specs)
    return StepResult(root, len(specs), nbytes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--variant", choices=VARIANTS, default="lora")
    parser.add_argument("--step", type=int, default=0)
    parser.add_argument("--scale", type=int, default=512, help="total size in MiB")
    parser.add_argument("--fresh", action="store_true", help="write dir/checkpoint-N")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = make_step(args.dir, args.variant, args.step, args.scale, in_place=not args.fresh)
    seconds = time.perf_counter() - start
    rate = result.bytes_written / MiB / max(seconds, 1e-9)
    print(
        f"{result.path}: {result.files_written} files, {result.bytes_written / MiB:.1f} MiB "
        f"in {seconds:.2f} s ({rate:.0f} MiB/s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
