"""Generation speed with and without the unlearning clamp, on the tiny LM (greedy, KV cache).

Times ``model.generate`` for the same prompts: without a clamp, with the clamp of a per-token SAE, and with
the clamp of an MTSAE (streaming encoder state), interleaved in one run; prints new tokens/s and the
ratios to the run without a clamp. Then the cost of one MTSAE decode step as the sequence grows: the
streaming step (the last ``receptive_field - 1`` inputs) vs re-encoding the whole prefix.

    python bench/bench_generate.py [--batch 4] [--prompt-len 32] [--new-tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from mtsae.evals.unlearning.intervention import GenerationClamp
from mtsae.lm.tiny_lm import build_tiny_lm
from mtsae.sae.model import MTSAE
from mtsae.sae.streaming import StreamingEncoder


def measure(
    batch: int = 4,
    prompt_len: int = 32,
    new_tokens: int = 64,
    d_sae: int = 256,
    layer: int = 2,
    repeats: int = 5,
    device: str = "cpu",
    lengths: tuple[int, ...] = (64, 256, 1024),
) -> dict:
    """Median generation times per variant (interleaved) and the decode-step times per length."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_lm(tmp)
        model = AutoModelForCausalLM.from_pretrained(tmp).to(device).eval()
    d = model.config.hidden_size
    ids = torch.randint(4, model.config.vocab_size, (batch, prompt_len), device=device)
    mask = torch.ones_like(ids)
    saes = {
        "per-token SAE": MTSAE(d, d_sae, dilations=[]),
        "MTSAE (1,2,4,8)": MTSAE(d, d_sae, dilations=[1, 2, 4, 8]),
    }
    for sae in saes.values():
        sae.to(device).eval()
        with torch.no_grad():
            sae.b_enc.fill_(0.05)  # the clamped features fire: the clamp does its full work
    runs = {"no clamp": None}
    runs.update(
        {name: GenerationClamp(model, layer, sae, list(range(10)), 20.0) for name, sae in saes.items()}
    )
    kw = dict(
        input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
        do_sample=False, pad_token_id=0,
    )  # fmt: skip

    def gen(clamp: GenerationClamp | None) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            if clamp is None:
                out = model.generate(**kw)
            else:
                with clamp:
                    out = model.generate(**kw)
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == prompt_len + new_tokens
        return time.perf_counter() - t0

    for clamp in runs.values():  # warm-up
        gen(clamp)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):  # interleaved, so machine noise hits every variant alike
        for name, clamp in runs.items():
            times[name].append(gen(clamp))
    sae = saes["MTSAE (1,2,4,8)"]
    return {
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "new_tokens": batch * new_tokens,
        "describe": (
            f"tiny LM d_model={d} layers={model.config.num_hidden_layers} B={batch} prompt={prompt_len} "
            f"new={new_tokens} d_sae={d_sae} layer={layer}"
        ),
        "receptive_field": sae.receptive_field,
        "decode_ms": {T: _decode_step_ms(sae, batch, T, device) for T in lengths},
    }


def run(cfg) -> list:  # noqa: ANN001 (bench.common.BenchConfig; imported lazily by bench/run_all.py)
    """Rows for ``bench/run_all.py``: generation time with each clamp / without, streaming vs re-encode."""
    from bench.common import Row

    lengths = (64, 256) if cfg.quick else (64, 256, 1024)
    m = measure(repeats=cfg.repeats, device=cfg.device.type, lengths=lengths)
    med = m["median_s"]
    rows = [
        Row(f"generate: time with {k} clamp / no clamp", med[k] / med["no clamp"], "", m["describe"])
        for k in med
        if k != "no clamp"
    ]
    for T, (stream_ms, full_ms) in m["decode_ms"].items():
        rows.append(
            Row(
                f"generate: MTSAE decode step, re-encode / streaming, T {T}",
                full_ms / stream_ms,
                "",
                f"streaming {stream_ms:.3f} ms, receptive field {m['receptive_field']}",
            )
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--d-sae", type=int, default=256)
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    m = measure(a.batch, a.prompt_len, a.new_tokens, a.d_sae, a.layer, a.repeats, a.device)
    med = m["median_s"]
    print(f"device={a.device} torch={torch.__version__} {m['describe']}")
    for k, v in med.items():
        print(
            f"  {k:<17} {m['new_tokens'] / v:9.1f} new tokens/s   time / no clamp = {v / med['no clamp']:.2f}"
        )
    print(f"  MTSAE decode step (receptive field {m['receptive_field']}), B={a.batch}, median of 50:")
    for T, (s, f) in m["decode_ms"].items():
        print(f"    T={T:<5} streaming {s:7.3f} ms   re-encode {f:7.3f} ms   ratio {f / s:6.1f}")


def _decode_step_ms(sae: MTSAE, batch: int, T: int, device: str, repeats: int = 50) -> tuple[float, float]:
    """Median ms of one new position after ``T``: streaming step vs encoding all ``T + 1`` positions."""
    x = torch.randn(batch, T + 1, sae.d_in, device=device)
    stream = StreamingEncoder(sae)
    fns = {
        "streaming": lambda: stream.step(x[:, T:]),  # the state stays at receptive_field - 1 positions
        "re-encode": lambda: sae.encode(x),
    }
    t: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        stream.step(x[:, :T])
        for _ in range(repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                t[name].append(time.perf_counter() - t0)
    return statistics.median(t["streaming"]) * 1e3, statistics.median(t["re-encode"]) * 1e3


if __name__ == "__main__":
    main()
