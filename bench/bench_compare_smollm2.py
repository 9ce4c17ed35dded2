"""The cost of configs/compare/smollm2.yaml per run, for sizing its budget (its header has the arithmetic).

1. One training step of each family of the grid (``SAEModule``'s maths: forward, losses, backward,
   decoder projection, fused Adam, renorm) on a ``[32, 128, 576]`` batch (4096 tokens, SmolLM2's width),
   one thread, interleaved repeats, medians; per ``--d-sae``.
2. With ``--unlearning``: the end-of-run cloze unlearning evaluation with the compare config's
   ``callbacks.Unlearning`` settings, for a random TopK MTSAE (needs ``make smollm2``; the question
   filter is read from ``--question-cache``, else computed: half an hour on one core).

    OMP_NUM_THREADS=1 python bench/bench_compare_smollm2.py --d-sae 1152 2304 [--unlearning]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

import torch  # noqa: E402
import yaml  # noqa: E402

from bench.common import interleaved, sae_step  # noqa: E402
from mtsae.training.module import SAEModule  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs/compare/smollm2.yaml"
D_IN, B, T = 576, 32, 128
MTSAE = dict(dilations=[1, 2, 4, 8])
FAMILIES = {
    "topk token": dict(dilations=[], separation="none", activation="topk", activation_kwargs={"k": 32}),
    "topk mtsae": dict(**MTSAE, separation="scales", activation="topk", activation_kwargs={"k": 32}),
    "topk frozen conv": dict(
        **MTSAE, separation="none", freeze_conv=True, activation="topk", activation_kwargs={"k": 32}
    ),
    "relu token": dict(dilations=[], separation="none", activation="relu"),
    "relu mtsae": dict(**MTSAE, separation="scales", activation="relu"),
}


def step_times(d_sae: int, repeats: int = 3) -> dict[str, float]:
    """Median seconds per training step of every family at ``d_sae``."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, D_IN, generator=gen)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[:, 0] = False  # BOS
    fns = {}
    for name, kwargs in FAMILIES.items():
        m = SAEModule(D_IN, d_sae, **kwargs)
        m.act_scale.fill_(1.0)
        opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-4, fused=True)
        fns[name] = lambda m=m, opt=opt: sae_step(m, opt, x, valid)
    return interleaved(fns, repeats=repeats, device=torch.device("cpu"), warmup=1)


def unlearning_time(question_cache: str | None) -> tuple[float, float, dict]:
    """Seconds to prepare (LM, data, question filter) and to evaluate one SAE, and the results."""
    from mtsae.evals.unlearning.config import UnlearningDuringTraining
    from mtsae.evals.unlearning.run import UnlearningRun
    from mtsae.evals.unlearning.selection import GridConfig
    from mtsae.sae.model import MTSAE as SAE

    raw = yaml.safe_load(CONFIG.read_text())
    cb = next(c for c in raw["overrides"]["trainer.callbacks"] if c["class_path"] == "callbacks.Unlearning")
    settings = dict(cb["init_args"]["config"])
    if question_cache:
        settings["question_cache_dir"] = question_cache
    cfg = UnlearningDuringTraining(**{**settings, "grid": GridConfig(**settings["grid"])})
    base = yaml.safe_load(Path(raw["base"]).read_text())["data"]["source"]["init_args"]
    source = SimpleNamespace(
        model_name=base["model_name"], revision=None, model_dtype="float32", layer=base["layer"]
    )
    t0 = time.perf_counter()
    run = UnlearningRun(cfg, source).prepare("cpu")
    t1 = time.perf_counter()
    torch.manual_seed(0)
    d_sae = int(raw["overrides"]["model.d_sae"])
    sae = SAE(D_IN, d_sae, **MTSAE, activation="topk", activation_kwargs={"k": 32}).eval()
    with torch.no_grad():
        res = run.evaluate(sae)
    return t1 - t0, time.perf_counter() - t1, res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-sae", type=int, nargs="+", default=[1152])
    p.add_argument("--unlearning", action="store_true", help="also time the end-of-run unlearning evaluation")
    p.add_argument("--question-cache", default=None, help="question_cache_dir (default: the config's)")
    args = p.parse_args()
    torch.set_num_threads(1)
    for d_sae in args.d_sae:
        for name, s in step_times(d_sae).items():
            print(f"d_sae {d_sae:5d}  {name:17s} {s:.3f} s per step of {B * T} tokens", flush=True)
    if args.unlearning:
        prep, ev, res = unlearning_time(args.question_cache)
        kept = res.get("n_kept") or res.get("n_kept_before_sample")
        print(
            f"unlearning: prepare {prep:.1f} s (LM, data, question filter), evaluate {ev:.1f} s; kept {kept}"
        )


if __name__ == "__main__":
    main()
