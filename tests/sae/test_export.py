"""The export format: safetensors + config.json with full metadata; the first format still loads."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mtsae import MTSAE, SAEMetadata, load_sae, read_metadata, save_sae
from mtsae.sae.export import ExportFormatError, git_commit
from tests.helpers.factories import tiny_sae

REPO = Path(__file__).resolve().parents[2]

META = SAEMetadata(
    model_name="google/gemma-2-2b",
    model_revision="abc123",
    model_dtype="bfloat16",
    layer=19,
    hook_name="blocks.19.hook_resid_post",
    context_size=1024,
    prepend_bos=True,
    activation_dtype="bfloat16",
    act_scale=0.0123,
    training_tokens=10_000,
    training_valid_tokens=9_990,
    global_step=7,
    data={"dataset": "HuggingFaceFW/fineweb", "split": "train"},
    git_commit="0" * 40,
    extra={"note": "x"},
)


def _randomised(sae: MTSAE) -> MTSAE:
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
        sae.normalize_decoder_()
    return sae.eval()


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"cascade": True, "dilations": [1, 3]},
        {"activation": "topk", "activation_kwargs": {"k": 4}},
        {"activation": "jumprelu", "dilations": []},
        {"activation": "batchtopk", "activation_kwargs": {"k": 4}, "dilations": [2]},
    ],
)
def test_save_load_round_trip(kw: dict, tmp_path: Path) -> None:
    sae = _randomised(tiny_sae(**kw))
    save_sae(sae, tmp_path / "sae", META)
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["config.json", "sae.safetensors"]
    back = load_sae(tmp_path / "sae")
    for (k, v), (k2, v2) in zip(sae.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k
    assert back.config() == sae.config() and not back.training
    x = torch.randn(2, 12, 32)
    torch.testing.assert_close(back(x).x_hat, sae(x).x_hat, atol=0, rtol=0)
    assert read_metadata(tmp_path / "sae") == META


def test_config_tells_what_a_user_needs(tmp_path: Path) -> None:
    save_sae(tiny_sae(dilations=[1, 2]), tmp_path / "sae", META.to_dict())  # a dict works too
    cfg = json.loads((tmp_path / "sae" / "config.json").read_text())
    assert cfg["format_version"] == 2 and cfg["dtype"] == "float32" and cfg["receptive_field"] == 5
    assert cfg["sae"] == {
        "d_in": 32,
        "d_sae": 64,
        "dilations": [1, 2],
        "activation": "relu",
        "activation_kwargs": {},
        "cascade": False,
        "encoder": "concat",
        "max_norm_multiple": None,  # the activation-sink rule (docs/design.md §3): off
    }
    m = cfg["metadata"]
    assert (m["model_name"], m["model_revision"], m["layer"], m["hook_name"]) == (
        "google/gemma-2-2b",
        "abc123",
        19,
        "blocks.19.hook_resid_post",
    )
    assert (m["context_size"], m["act_scale"], m["training_tokens"]) == (1024, 0.0123, 10_000)
    assert set(cfg["versions"]) == {"mtsae", "torch"}
    with safe_open(
        str(tmp_path / "sae" / "sae.safetensors"), framework="pt"
    ) as fh:  # self-describing weights
        assert fh.metadata()["format"] == "mtsae" and json.loads(fh.metadata()["config"]) == cfg


def test_first_format_still_loads(tmp_path: Path) -> None:
    """``config.json`` (constructor arguments + metadata) and ``sae.pt`` (a pickled state dict)."""
    sae = _randomised(tiny_sae(activation="topk", activation_kwargs={"k": 3}))
    out = tmp_path / "old"
    out.mkdir()
    meta = {"global_step": 12, "act_scale": 0.5}
    (out / "config.json").write_text(json.dumps({**sae.config(), "metadata": meta}))
    torch.save({k: v.detach() for k, v in sae.state_dict().items()}, out / "sae.pt")
    back = load_sae(out)
    x = torch.randn(1, 9, 32)
    torch.testing.assert_close(back.encode(x), sae.encode(x), atol=0, rtol=0)
    got = read_metadata(out)
    assert got.global_step == 12 and got.act_scale == 0.5 and got.model_name is None


def test_unknown_metadata_keys_are_kept_in_extra() -> None:
    got = SAEMetadata.from_dict({"layer": 3, "hook_point": "h", "extra": {"a": 1}})
    assert got.layer == 3 and got.extra == {"a": 1, "hook_point": "h"}


def test_unreadable_folders_say_why(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a folder"):
        load_sae(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "weights.bin").write_text("")
    with pytest.raises(ExportFormatError, match=r"config.json \+ sae.safetensors.*found \['weights.bin'\]"):
        load_sae(tmp_path / "other")
    save_sae(tiny_sae(), tmp_path / "future")
    cfg = json.loads((tmp_path / "future" / "config.json").read_text())
    (tmp_path / "future" / "config.json").write_text(json.dumps({**cfg, "format_version": 99}))
    with pytest.raises(ExportFormatError, match="format_version=99.*upgrade mtsae"):
        load_sae(tmp_path / "future")
    save_sae(tiny_sae(), tmp_path / "mixed")
    cfg["sae"]["d_sae"] = 65
    (tmp_path / "mixed" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        ExportFormatError, match=r"do not fit its config \(W_dec: config \(65, 32\), weights \(64, 32\)"
    ):
        load_sae(tmp_path / "mixed")


def test_git_commit(tmp_path: Path) -> None:
    here = git_commit()
    if here is not None:  # this package is inside a git work tree
        sha = here.removesuffix("+dirty")
        assert len(sha) == 40 and int(sha, 16) >= 0
    assert git_commit(tmp_path) is None  # not a repository


def test_training_run_writes_a_saelens_folder_for_a_per_token_sae(tmp_path: Path) -> None:
    from callbacks.export import ExportSAE
    from tests.helpers.train import tiny_args
    from train import cli_main

    extra = ("--trainer.max_steps", "3", "--model.dilations", "[]", "--model.separation", "none")
    cli = cli_main(tiny_args(tmp_path, *extra), run=False)
    export = next(cb for cb in cli.trainer.callbacks if isinstance(cb, ExportSAE))
    export.saelens_dirname = "sae_saelens"
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    ours, theirs = load_sae(export.path), load_sae(export.path.parent / "sae_saelens")
    x = torch.randn(2, 16, 16)
    torch.testing.assert_close(theirs.encode(x), ours.encode(x))
    meta = read_metadata(export.path.parent / "sae_saelens")
    assert meta == read_metadata(export.path) and meta.training_tokens == 3 * 16 * 16

    # an MTSAE has no SAELens form: the run fails before training
    cli = cli_main(tiny_args(tmp_path / "mt", "--trainer.max_steps", "3"), run=False)
    next(cb for cb in cli.trainer.callbacks if isinstance(cb, ExportSAE)).saelens_dirname = "x"
    with pytest.raises(ValueError, match="has no SAELens form"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 0


def test_an_exported_sae_has_the_same_bytes_in_every_process(tmp_path: Path) -> None:
    """safetensors orders its metadata by a per-process hash: the same SAE gave different SHA-256."""
    import subprocess
    import sys

    script = (
        "import sys, torch\n"
        "from mtsae import save_sae\n"
        "from mtsae.sae.model import MTSAE\n"
        "torch.manual_seed(0)\n"
        "save_sae(MTSAE(8, 16, dilations=[1, 2]), sys.argv[1])\n"
    )
    digests = set()
    for i in range(4):  # a different hash seed per process, as in separate runs
        env = {**__import__("os").environ, "PYTHONHASHSEED": "random"}
        subprocess.run([sys.executable, "-c", script, str(tmp_path / str(i))], check=True, env=env, cwd=REPO)
        digests.add(hashlib.sha256((tmp_path / str(i) / "sae.safetensors").read_bytes()).hexdigest())
    assert len(digests) == 1
    sae = load_sae(tmp_path / "0")
    assert sae.d_sae == 16 and read_metadata(tmp_path / "0") is not None


def _edit_sae_config(folder: Path, **sae_args) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["sae"].update(sae_args)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"d_sae": 10**8}, r"do not fit its config \(W_dec: config \(100000000, 8\), weights \(16, 8\)"),
        ({"bogus": 1}, "the SAE's arguments are not valid .*unexpected keyword argument 'bogus'"),
        ({"dilations": [-1]}, r"dilations must be positive integers, got \[-1\]"),
        ({"activation": "gelu"}, "unknown activation 'gelu'"),
        ({"activation": "topk", "activation_kwargs": {"k": 99}}, "k must satisfy 0 < k <= d_sae=16"),
    ],
)
def test_an_untrusted_sae_config_is_refused_before_allocation(tmp_path: Path, edit, message) -> None:
    save_sae(MTSAE(8, 16, dilations=[1, 2]), tmp_path)
    _edit_sae_config(tmp_path, **edit)
    with pytest.raises(ExportFormatError, match=message):
        load_sae(tmp_path)  # d_sae 1e8 would allocate 6.4 GB before the weights were looked at


def test_a_forged_safetensors_header_is_one_message(tmp_path: Path) -> None:
    save_sae(MTSAE(8, 16, dilations=[1, 2]), tmp_path)
    weights = tmp_path / "sae.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = (10**12).to_bytes(8, "little")  # a header "a terabyte long"
    weights.write_bytes(bytes(data))
    with pytest.raises(ExportFormatError, match="is not a readable safetensors file"):
        load_sae(tmp_path)
