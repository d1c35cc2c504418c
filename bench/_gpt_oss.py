"""bench/moe.py's gpt-oss rows: a random gpt-oss-shape checkpoint with MXFP4 experts and its bf16
twin, written without transformers' model classes; the rows' summary and report.

Instantiating ``GptOssForCausalLM`` at gpt-oss's width makes every expert in float32 (about 4.8
GB a layer of 32) and ``quantize`` then takes seconds per expert on a CPU; neither is needed.
The MXFP4 experts are drawn *packed*: uniformly random FP4 codes (two to a byte) and per-block
exponents 2**-8 .. 2**-6 (values of about 0.02 root mean square, the scale of gpt-oss's
initializer), which is a valid MXFP4 tensor like any other. The twin holds the same numbers in
bf16: ``dequantize(blocks, scales, torch.bfloat16)`` of each expert, transposed to [in, out] as
transformers stores ``gate_up_proj`` [E, hidden, 2 * intermediate] and ``down_proj`` [E,
intermediate, hidden] (exact: an FP4 value times a power of two is a bf16 number). Everything else
— attention with its biases and sinks, router, norms, embedding, head — is drawn once and
written identically into both files, in bf16. So the two checkpoints are one model; a decode of
each in bf16 computes with equal weights and must give equal tokens.

The names, shapes and config are transformers' (``GptOssConfig`` with gpt-oss-20b's published
values, fewer layers and a smaller vocabulary); tierflow's checkpoint index checks every shape
when it opens the files. Each file is written tensor by tensor at its header's offsets (peak
memory: one expert's weights), fsynced and dropped from the page cache, so the benchmark's first
reads come from the disk. A build is reused when ``bench_meta.json`` matches its shape and seed.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from tierflow.adapters.mxfp4 import BLOCK, dequantize, packed_bytes

MXFP4_DIR, BF16_DIR = "mxfp4", "bf16"
_DTYPE_NAMES = {torch.bfloat16: "BF16", torch.uint8: "U8"}
_SCALE_LOW, _SCALE_HIGH = 127 - 8, 127 - 6          # block exponents 2**-8 .. 2**-6


@dataclass(frozen=True, slots=True)
class GptOssShape:
    hidden: int = 2880
    intermediate: int = 2880
    layers: int = 3
    experts: int = 32
    experts_per_token: int = 4
    heads: int = 64
    kv_heads: int = 8
    head_dim: int = 64
    vocab: int = 8192
    sliding_window: int = 128

    def expert_packed_bytes(self) -> int:
        """One expert in MXFP4: its two matrices' blocks and scales, and its bf16 biases."""
        h, i = self.hidden, self.intermediate
        return packed_bytes(2 * i, h) + packed_bytes(h, i) + 2 * (2 * i + h)

    def expert_bf16_bytes(self) -> int:
        h, i = self.hidden, self.intermediate
        return 2 * (3 * h * i + 2 * i + h)


def _dense_tensors(s: GptOssShape) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init) of every float tensor outside the experts; init: "normal", "bias", "norm", "sink"."""
    h, q, kv = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim
    out = [("model.embed_tokens.weight", (s.vocab, h), "normal"), ("lm_head.weight", (s.vocab, h), "normal"),
           ("model.norm.weight", (h,), "norm")]
    for layer in range(s.layers):
        p = f"model.layers.{layer}."
        out += [(p + "input_layernorm.weight", (h,), "norm"), (p + "post_attention_layernorm.weight", (h,), "norm")]
        for proj, rows, cols in (("q_proj", q, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, q)):
            out += [(p + f"self_attn.{proj}.weight", (rows, cols), "normal"), (p + f"self_attn.{proj}.bias", (rows,), "bias")]
        out += [(p + "self_attn.sinks", (s.heads,), "sink"), (p + "mlp.router.weight", (s.experts, h), "normal"),
                (p + "mlp.router.bias", (s.experts,), "bias"),
                (p + "mlp.experts.gate_up_proj_bias", (s.experts, 2 * s.intermediate), "bias"),
                (p + "mlp.experts.down_proj_bias", (s.experts, h), "bias")]
    return out


def _expert_tensors(s: GptOssShape, mxfp4: bool) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    h, i, e = s.hidden, s.intermediate, s.experts
    out = []
    for layer in range(s.layers):
        p = f"model.layers.{layer}.mlp.experts."
        if mxfp4:              # [E, out, in / 32, 16] and [E, out, in / 32]
            out += [(p + "gate_up_proj_blocks", (e, 2 * i, h // BLOCK, BLOCK // 2), torch.uint8),
                    (p + "gate_up_proj_scales", (e, 2 * i, h // BLOCK), torch.uint8),
                    (p + "down_proj_blocks", (e, h, i // BLOCK, BLOCK // 2), torch.uint8),
                    (p + "down_proj_scales", (e, h, i // BLOCK), torch.uint8)]
        else:                  # [E, in, out]
            out += [(p + "gate_up_proj", (e, h, 2 * i), torch.bfloat16), (p + "down_proj", (e, i, h), torch.bfloat16)]
    return out


class _Writer:
    """One safetensors file written at its header's offsets (any order), then synced."""

    def __init__(self, path: Path, tensors: list[tuple[str, tuple[int, ...], torch.dtype]]) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dims, dtype in tensors:
            nbytes = math.prod(dims) * dtype.itemsize
            header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(dims), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)          # data 8-byte aligned, as save_file writes it
        self._base, self._header = 8 + len(raw), header
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self._fd, len(raw).to_bytes(8, "little") + raw, 0)

    def write(self, name: str, t: torch.Tensor, index: int = 0) -> None:
        """``t``'s bytes at ``name``'s offset, or at its ``index``-th slice along the first dim."""
        data = t.contiguous().view(torch.uint8).numpy().tobytes()
        start = self._header[name]["data_offsets"][0] + index * len(data)
        os.pwrite(self._fd, data, self._base + start)

    def close(self) -> None:
        os.fsync(self._fd)
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(self._fd)


def _config(s: GptOssShape) -> dict[str, Any]:
    from transformers import GptOssConfig

    types = ["sliding_attention" if k % 2 == 0 else "full_attention" for k in range(s.layers)]
    cfg = GptOssConfig(hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=s.layers,
                       num_local_experts=s.experts, num_experts_per_tok=s.experts_per_token,
                       num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, head_dim=s.head_dim,
                       vocab_size=s.vocab, sliding_window=s.sliding_window, layer_types=types,
                       bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return cfg.to_dict() | {"architectures": ["GptOssForCausalLM"], "dtype": "bfloat16"}


def _mxfp4_expert(rows: int, columns: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = torch.randint(0, 256, (rows, columns // BLOCK, BLOCK // 2), dtype=torch.uint8, generator=gen)
    scales = torch.randint(_SCALE_LOW, _SCALE_HIGH + 1, (rows, columns // BLOCK), dtype=torch.uint8, generator=gen)
    return blocks, scales


def _dense_value(dims: tuple[int, ...], init: str, gen: torch.Generator) -> torch.Tensor:
    t = torch.randn(dims, generator=gen)
    scale = {"normal": 0.02, "bias": 0.1, "norm": 0.1, "sink": 1.0}[init]
    return (t * scale + (1.0 if init == "norm" else 0.0)).to(torch.bfloat16)


def build_pair(directory: Path, shape: GptOssShape = GptOssShape(), *, seed: int = 0,
               log: Callable[[str], None] = print) -> tuple[Path, Path, bool]:
    """Write (or reuse) ``directory``/mxfp4 and ``directory``/bf16. Returns (mxfp4, bf16, reused)."""
    meta = {"shape": asdict(shape), "seed": seed, "writer": "bench/_gpt_oss.py build_pair"}
    paths = directory / MXFP4_DIR, directory / BF16_DIR
    meta_path = directory / "bench_meta.json"
    if meta_path.exists() and all((p / "model.safetensors").exists() for p in paths):
        try:
            if json.loads(meta_path.read_text()) == meta:
                return *paths, True
        except ValueError:
            pass
    meta_path.unlink(missing_ok=True)
    for p in paths:
        p.mkdir(parents=True, exist_ok=True)
    dense = [(name, dims, torch.bfloat16) for name, dims, _ in _dense_tensors(shape)]
    packed = _Writer(paths[0] / "model.safetensors", dense + _expert_tensors(shape, True))
    twin = _Writer(paths[1] / "model.safetensors", dense + _expert_tensors(shape, False))
    gen = torch.Generator().manual_seed(seed)
    for name, dims, init in _dense_tensors(shape):
        t = _dense_value(dims, init, gen)
        packed.write(name, t)
        twin.write(name, t)
    for layer, name, (rows, columns) in _expert_matrices(shape):
        p = f"model.layers.{layer}.mlp.experts.{name}"
        for expert in range(shape.experts):
            blocks, scales = _mxfp4_expert(rows, columns, gen)
            packed.write(p + "_blocks", blocks, expert)
            packed.write(p + "_scales", scales, expert)
            twin.write(p, dequantize(blocks, scales, torch.bfloat16).t(), expert)     # [in, out]
        log(f"  layer {layer} {name}: {shape.experts} experts written")
    packed.close()
    twin.close()
    config = _config(shape)
    (paths[1] / "config.json").write_text(json.dumps(config, indent=2))
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (paths[0] / "config.json").write_text(json.dumps(config, indent=2))
    meta_path.write_text(json.dumps(meta))
    return *paths, False


def _expert_matrices(s: GptOssShape) -> Iterator[tuple[int, str, tuple[int, int]]]:
    """(layer, weight, (out, in)) of every stacked expert matrix, in the order they are drawn."""
    for layer in range(s.layers):
        yield layer, "gate_up_proj", (2 * s.intermediate, s.hidden)
        yield layer, "down_proj", (s.hidden, s.intermediate)


def summarize(rounds: list[dict[str, dict[str, Any]]], caches: list[str]) -> dict[str, dict[str, Any]]:
    """Per cache setting: medians over the rounds of each format's figures and of the MXFP4 ÷ bf16 ratios."""
    summary = {}
    for cache in caches:
        m = [r[f"mxfp4, {cache}"] for r in rounds]
        b = [r[f"bf16, {cache}"] for r in rounds]
        summary[cache] = {
            "mxfp4_bytes_per_token": statistics.median(r["bytes_per_token"] for r in m),
            "bf16_bytes_per_token": statistics.median(r["bytes_per_token"] for r in b),
            "mxfp4_expected_bytes_per_token": statistics.median(r["expected_bytes_per_token"] for r in m),
            "bf16_expected_bytes_per_token": statistics.median(r["expected_bytes_per_token"] for r in b),
            "bytes_within_expected": all(r["bytes_within_expected"] and r["bytes_all_experts_and_dense"] for r in m + b),
            "mxfp4_s_per_token": statistics.median(r["s_per_token"] for r in m),
            "bf16_s_per_token": statistics.median(r["s_per_token"] for r in b),
            "bytes_ratio": statistics.median(x["bytes_per_token"] / y["bytes_per_token"] for x, y in zip(m, b)),
            "time_ratio": statistics.median(x["s_per_token"] / y["s_per_token"] for x, y in zip(m, b)),
            "hit_rate": {"mxfp4": statistics.median(r["hit_rate"] for r in m),
                         "bf16": statistics.median(r["hit_rate"] for r in b)},
            "tokens_identical": all(x["tokens"] == y["tokens"] == m[0]["tokens"] for x, y in zip(m, b)),
            "foreign_cpu_load_max": max(r["foreign_cpu_load"] for r in m + b),
            # the machine is shared: each round's ratio with the other load of its two runs, so a
            # round that ran alone can be told from one that did not
            "by_round": [{"time_ratio": x["s_per_token"] / y["s_per_token"],
                          "foreign_cpu_load": max(x["foreign_cpu_load"], y["foreign_cpu_load"])} for x, y in zip(m, b)],
        }
    return summary


def report_gpt_oss(g: dict[str, Any]) -> None:
    s, nominal = g["shape"], g["nominal_expert_bytes"]
    print(f"\ngpt-oss shape: hidden {s['hidden']}, {s['layers']} layers, {s['experts']} experts of width "
          f"{s['intermediate']}, top-{s['experts_per_token']}; all experts {g['all_expert_bytes']['mxfp4'] / 1e9:.2f} GB "
          f"MXFP4 / {g['all_expert_bytes']['bf16'] / 1e9:.2f} GB bf16; one expert {nominal['mxfp4'] / 1e6:.2f} / "
          f"{nominal['bf16'] / 1e6:.2f} MB (ratio {g['nominal_bytes_ratio']:.4f}); {g['new_tokens']} greedy tokens "
          f"from a {len(g['prompt'])}-token prompt, {g['dtype']} compute for both; {len(g['rounds'])} interleaved rounds")
    head = (f"{'run':<36}{'round':>6}{'read/token':>13}{'expected':>12}{'routed x own':>14}{'picked/layer':>13}"
            f"{'hit rate':>9}{'time/token':>12}{'other CPU':>10}")
    print(head + "\n" + "-" * len(head))
    for k, row in enumerate(g["rounds"]):
        for name, r in row.items():
            print(f"{name:<36}{k + 1:>6}{r['bytes_per_token'] / 1e6:>10.1f} MB{r['expected_bytes_per_token'] / 1e6:>9.1f} MB"
                  f"{r['routed_nominal_bytes_per_token'] / 1e6:>11.1f} MB{r['experts_routed_per_layer']:>13.2f}"
                  f"{r['hit_rate']:>9.2f}{r['s_per_token']:>10.2f} s{r['foreign_cpu_load']:>10.2f}")
    for cache, t in g["summary"].items():
        print(f"{cache}: MXFP4 {t['mxfp4_bytes_per_token'] / 1e6:.1f} MB/token vs bf16 {t['bf16_bytes_per_token'] / 1e6:.1f}"
              f" MB/token: ratio {t['bytes_ratio']:.4f} (nominal {g['nominal_bytes_ratio']:.4f}); read = dense + experts "
              f"read x their bytes: {'yes' if t['bytes_within_expected'] else 'NO'}; time {t['mxfp4_s_per_token']:.2f} vs "
              f"{t['bf16_s_per_token']:.2f} s/token: ratio {t['time_ratio']:.2f}; tokens identical: "
              f"{'yes' if t['tokens_identical'] else 'NO'}")
        quiet = min(t["by_round"], key=lambda q: q["foreign_cpu_load"])
        ratios = ", ".join(f"{q['time_ratio']:.2f}" for q in t["by_round"])
        print(f"  time ratio by round: {ratios}; in the round with "
              f"the least other load ({quiet['foreign_cpu_load']:.2f} CPUs): {quiet['time_ratio']:.2f}")

