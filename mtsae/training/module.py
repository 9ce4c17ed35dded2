"""``SAEModule``: the LightningModule that owns the losses, the optimisation and the logging.

The SAE itself is a plain :class:`mtsae.MTSAE` in ``self.sae``. Inputs are multiplied by a constant
``act_scale`` so that ``E||x||^2 = d_in`` on the training data (estimated once from the cache
statistics); :meth:`SAEModule.export_sae` folds the constant back in, so the exported SAE acts on raw
activations.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor

from mtsae.sae.model import MTSAE, ForwardOutput
from mtsae.sae.scale import ScaledSAE, input_scale
from mtsae.training.aux_losses import DeadLatentTracker, auxk_loss
from mtsae.training.losses import (
    SCALE_KINDS,
    SEPARATION_KINDS,
    codes_separation,
    context_decorrelation,
    decoder_separation,
    fvu,
    l1_sparsity,
    recon_loss,
    scales_decorrelation,
    scales_separation,
)
from mtsae.training.metrics import ReconstructionMetrics
from mtsae.training.schedulers import WarmupDecayLR

__all__ = ["NonFiniteLossError", "ResumeSettingsError", "SAEModule"]

#: optimizer and scheduler state entries that are not settings (they evolve, or choose an implementation)
_NOT_SETTINGS = {
    "params", "lr", "initial_lr", "fused", "foreach", "capturable", "differentiable",
    "last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step", "_is_initial", "base_lrs",
    "lr_lambdas", "verbose", "total_steps",
}  # fmt: skip


class ResumeSettingsError(ValueError):
    """``--ckpt_path`` names a checkpoint of a run whose settings differ from this configuration's."""


def model_settings_differ(
    saved: dict[str, Any], config: dict[str, Any], defaults: dict[str, Any] | None = None
) -> str | None:
    """Why a checkpoint with hyperparameters ``saved`` cannot resume into the model ``config``, or None.

    A resumed run continues *that* run: a model setting that differs (``d_sae``, ``sparsity_coeff``, ...)
    would either fail to load or be silently replaced by one side. A setting the checkpoint lacks (added
    since it was written) ran at its default (``defaults``, e.g. ``max_norm_multiple`` off): the config
    must keep that default. A setting missing from ``config`` or without a default is not compared.
    """
    defaults = defaults or {}
    saved = {**{k: defaults[k] for k in set(config) - set(saved) if k in defaults}, **saved}
    differ = sorted(k for k in set(saved) & set(config) if _plain(saved[k]) != _plain(config[k]))
    if not differ:
        return None
    detail = "; ".join(f"{k}: checkpoint {saved[k]!r}, config {config[k]!r}" for k in differ[:6])
    return (
        f"the checkpoint's model settings differ from this configuration's ({detail}): resume with the "
        "settings of the checkpoint's run (its config.yaml), or drop --ckpt_path to start a new run"
    )


def _optimizer_settings(optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """The optimizer's and scheduler's settings as a resumed run would use them (from their states).

    A checkpoint's optimizer state replaces the configured hyperparameters of every parameter group,
    and a scheduler's state its settings (``warmup_steps`` ...): comparing this before and after the
    restore shows what a resume would silently change.
    """
    out: dict[str, Any] = {}
    for i, group in enumerate(optimizer.param_groups):
        out[f"lr[{i}]"] = group.get("initial_lr", group["lr"])  # the scheduler's base, else the constant LR
        out |= {f"{k}[{i}]": v for k, v in group.items() if k not in _NOT_SETTINGS}
    if scheduler is not None:
        out |= {k: v for k, v in scheduler.state_dict().items() if k not in _NOT_SETTINGS}
    return out


def _init_defaults() -> dict[str, Any]:
    """The default of every :class:`SAEModule` setting that has one (what a checkpoint without it ran at)."""
    params = inspect.signature(SAEModule.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the first such step and its cause."""


def _plain(v: Any) -> Any:
    """Lists and tuples compare alike (YAML gives lists, defaults are tuples); tensors as lists."""
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _probe_optimizer(optimizer: OptimizerCallable, lr_scheduler: LRSchedulerCallable | None) -> None:
    """Build the optimizer and scheduler once on a one-element parameter, so that their own argument
    checks (a negative or NaN learning rate, negative warm-up steps...) run when the model is configured."""
    try:
        probe = optimizer([torch.nn.Parameter(torch.zeros(1))])
        if lr_scheduler is not None:
            lr_scheduler(probe)
    except (ValueError, TypeError) as err:
        raise ValueError(f"model.optimizer / model.lr_scheduler: {err}") from None


class SAEModule(L.LightningModule):
    """Train an MTSAE (or, with ``dilations: []``, a per-token SAE).

    Args:
        d_in: activation width (linked from ``data.d_in``; do not type it).
        d_sae: number of features.
        dilations: dilations of the causal depth-wise conv branches; ``[]`` = per-token SAE.
        activation: ``relu``, ``topk``, ``batchtopk`` or ``jumprelu``.
        activation_kwargs: options of the activation (``k: 32`` for top-k variants, ...).
        freeze_conv: keep the convolutions at the exact identity (a control: the MTSAE's encoder
            parameterisation without temporal context; ``context_init_std`` is then not applied).
        cascade: stack the conv branches (receptive field ``1 + 2·sum(dilations)``) instead of running
            them side by side on the input (``1 + 2·max(dilations)``); see :class:`mtsae.MTSAE`.
        encoder: ``concat`` (the branches side by side before ``W_enc``) or ``mix`` (their mean, one
            causal kernel, before a ``d_in x d_sae`` ``W_enc``: a step costs about a per-token SAE's).
        sparsity_coeff: weight of the sparsity penalty: L1 of the codes for ``relu``, the (straight-through)
            L0 for ``jumprelu``; unused by ``topk`` / ``batchtopk``, whose sparsity is fixed by ``k``.
        sparsity_warmup_steps: steps of linear warm-up of ``sparsity_coeff`` from 0.
        context_init_std: size of the seeded perturbation of the conv context taps at initialisation
            (see :class:`mtsae.MTSAE`); it lets the ``scales`` kinds act from the first step.
        separation: cosine feature-separation loss: ``scales`` (``relu(cos)`` between dilation branches),
            ``scales_decorr`` (``cos^2`` between them: not met by a sign flip), ``context_decorr``
            (``cos^2`` between what the branches add from earlier tokens, ``conv_r(u) - centre_tap_r * u``:
            the branch outputs share the token itself, so their cosine stays near 1), ``decoder``,
            ``codes`` or ``none``.
        separation_coeff: its weight; with 0 the term is still computed (without gradient) and logged.
        separation_max_tokens: tokens sampled per batch by the ``codes`` kind (bounds its cost).
        separation_max_pairs: co-active feature pairs sampled per batch by the ``decoder`` kind.
        auxk_coeff: weight of the AuxK loss for dead latents (``topk`` / ``batchtopk``; Gao et al. 2024).
        auxk_k: latents used by AuxK (default ``d_in // 2``).
        max_norm_multiple: the activation-sink rule (``docs/design.md`` §3): a valid position whose
            activation norm exceeds this multiple of the batch's median valid norm is treated like a
            BOS/EOS/PAD position (zeroed, left out of every loss and metric, and of the evaluations of
            the saved SAE, which carries the setting). ``null`` (default): off. 10 for SmolLM2 / Gemma 3.
        dead_after_tokens: a latent that has not fired for this many training tokens counts as dead.
        scale_activations: multiply inputs by a constant so that ``E||x||^2 = d_in`` (from the cache).
        init_b_dec_from_data: initialise ``b_dec`` to the mean training activation.
        optimizer: optimizer factory (YAML ``class_path``/``init_args``); Adam by default. The configs
            ask for ``fused: true``: one kernel for all parameters, several times faster than the
            per-parameter loop on CPU and GPU (``bench/bench_step.py``).
        lr_scheduler: LR scheduler factory, stepped every optimizer step; ``None`` for a constant LR.
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int = 512,
        dilations: Sequence[int] = (1, 2, 4, 8),
        activation: str = "relu",
        activation_kwargs: dict[str, Any] | None = None,
        cascade: bool = False,
        encoder: str = "concat",
        freeze_conv: bool = False,
        context_init_std: float = 0.01,
        sparsity_coeff: float = 5.0,
        sparsity_warmup_steps: int = 0,
        separation: str = "scales",
        separation_coeff: float = 0.1,
        separation_max_tokens: int = 1024,
        separation_max_pairs: int = 4096,
        auxk_coeff: float = 1 / 32,
        auxk_k: int | None = None,
        max_norm_multiple: float | None = None,
        dead_after_tokens: int = 10_000_000,
        scale_activations: bool = True,
        init_b_dec_from_data: bool = True,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        if separation not in SEPARATION_KINDS:
            raise ValueError(f"separation must be one of {SEPARATION_KINDS}, got {separation!r}")
        if separation in SCALE_KINDS and len(dilations) < 2:
            raise ValueError(
                f"separation {separation!r} compares dilation branches and needs at least two dilations, got "
                f"{list(dilations)}; use separation: none, decoder or codes for this model"
            )
        for name, v in [
            ("sparsity_coeff", sparsity_coeff),
            ("sparsity_warmup_steps", sparsity_warmup_steps),
            ("separation_coeff", separation_coeff),
            ("auxk_coeff", auxk_coeff),
            ("context_init_std", context_init_std),
        ]:
            if not 0 <= v < math.inf:  # NaN fails too (it would silently act as 0 or poison the weights)
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        if dead_after_tokens < 1:
            raise ValueError(f"dead_after_tokens must be >= 1, got {dead_after_tokens}")
        if d_sae < 2:  # the evaluations compare features in pairs (decoder coherence, separation)
            raise ValueError(f"d_sae must be >= 2, got {d_sae}")
        _probe_optimizer(optimizer, lr_scheduler)  # bad lr, warmup_steps...: refused before any work
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.sae = MTSAE(
            d_in,
            d_sae,
            dilations=dilations,
            activation=activation,
            activation_kwargs=activation_kwargs,
            cascade=cascade,
            encoder=encoder,
            context_init_std=0.0 if freeze_conv else context_init_std,
            max_norm_multiple=max_norm_multiple,
        )
        self.sae.conv_weight.requires_grad_(bool(self.sae.dilations) and not freeze_conv)
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.dead_tracker = DeadLatentTracker(d_sae)
        self.auxk_k = auxk_k if auxk_k is not None else max(1, d_in // 2)
        self.register_buffer("act_scale", torch.tensor(1.0))
        self.register_buffer("data_initialised", torch.tensor(False))
        self.val_metrics = ReconstructionMetrics(d_in, d_sae)
        # the first step whose loss was not finite, and what was not finite in it (kept on the device)
        self._nonfinite: tuple[Tensor, Tensor] | None = None
        self._nonfinite_names: list[str] = []
        self._configured_settings: dict[str, Any] | None = None  # set by configure_optimizers

    # ------------------------------------------------------------------ set-up from the data
    def initialise_from_stats(self, stats: dict, force: bool = False) -> bool:
        """Set ``act_scale`` (so that ``E||x||^2 = d_in``) and ``b_dec`` from cache statistics.

        Done once per run: a module restored from a checkpoint is left alone unless ``force``.
        Returns whether anything was set.
        """
        if bool(self.data_initialised) and not force:
            return False
        hp = self.hparams
        if hp.scale_activations:
            self.act_scale.fill_(input_scale(hp.d_in, stats["mean_sq_norm"]))
        if hp.init_b_dec_from_data:
            mean = torch.tensor(stats["mean"], dtype=self.sae.b_dec.dtype, device=self.sae.b_dec.device)
            with torch.no_grad():
                self.sae.b_dec.copy_(self.raw_sae.scale(mean))
        self.data_initialised.fill_(True)
        return True

    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        if dm is None or not hasattr(dm, "stats") or bool(self.data_initialised):
            return
        rule = self.sae.max_norm_multiple
        if rule is not None and hasattr(dm, "stats_without_sinks"):
            # the scale and b_dec from the tokens the SAE reads, not from the sinks the rule drops
            self.initialise_from_stats(dm.stats_without_sinks(rule))
        else:
            self.initialise_from_stats(dm.stats)

    # ------------------------------------------------------------------ steps
    @property
    def raw_sae(self) -> ScaledSAE:
        """The SAE seen from raw activations (the owner of ``act_scale``: scale, unscale, fold)."""
        return ScaledSAE(self.sae, self.act_scale)

    def forward(self, x: Tensor, valid: Tensor | None = None) -> ForwardOutput:
        """Run the SAE on raw activations ``[B, T, d_in]`` (scaled internally); outputs are scaled."""
        return self.sae(self.raw_sae.scale(x.float()), valid)

    def _losses(self, x: Tensor, valid: Tensor, out: ForwardOutput) -> dict[str, Tensor]:
        hp = self.hparams
        terms = {"recon": recon_loss(x, out.x_hat, valid)}
        loss = terms["recon"]
        act = self.sae.act
        if (act.uses_l1 or act.uses_l0) and hp.sparsity_coeff > 0:
            warm = 1.0
            if hp.sparsity_warmup_steps > 0:
                warm = min(1.0, (self.global_step + 1) / hp.sparsity_warmup_steps)
            terms["sparsity"] = l1_sparsity(out.f, valid) if act.uses_l1 else act.l0_penalty(out.pre, valid)
            loss = loss + hp.sparsity_coeff * warm * terms["sparsity"]
        if act.uses_auxk and hp.auxk_coeff > 0 and self.training:
            dead = self.dead_tracker.dead_mask(hp.dead_after_tokens)
            terms["auxk"] = auxk_loss(out.pre, x - out.x_hat, self.sae.W_dec, dead, self.auxk_k, valid)
            # AuxK is a normalised MSE (Gao et al.); recon is not, so weight it by the batch variance
            xv = x[valid]
            var = (xv - xv.mean(0)).pow(2).sum(-1).mean().detach()
            loss = loss + hp.auxk_coeff * var * terms["auxk"]
        if hp.separation != "none":
            # with weight 0 the term is still computed (without gradient) and logged: a run to compare with
            with torch.set_grad_enabled(torch.is_grad_enabled() and hp.separation_coeff > 0):
                terms["separation"] = self._separation(x, valid, out)
            if hp.separation_coeff > 0:
                loss = loss + hp.separation_coeff * terms["separation"]
        terms["loss"] = loss
        return terms

    def _separation(self, x: Tensor, valid: Tensor, out: ForwardOutput) -> Tensor:
        """The separation term of kind ``hparams.separation`` (not ``none``) on a batch."""
        hp = self.hparams
        if hp.separation == "scales":
            return scales_separation(out.z_scales, valid)
        if hp.separation == "scales_decorr":
            return scales_decorrelation(out.z_scales, valid)
        if hp.separation == "context_decorr":
            u = self.sae.encoder_input(x, valid)  # [B, T, d_in]
            return context_decorrelation(self.sae.context_contributions(u, out.z_scales), valid)
        if hp.separation == "decoder":
            return decoder_separation(self.sae.W_dec, out.f, valid, hp.separation_max_pairs)
        return codes_separation(out.f, valid, hp.separation_max_tokens)

    def _inputs(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Scaled activations ``[B, T, d_in]``, zero at invalid positions (whatever is stored there, an
        overflowed BOS included, never reaches the encoder, the losses or their gradients), and ``valid``:
        the cache's, less the activation sinks of ``max_norm_multiple`` (one mask for every loss and metric)."""
        x = self.raw_sae.scale(batch["acts"].float())
        valid = self.sae.valid_positions(x, batch["valid"])
        return torch.where(valid.unsqueeze(-1), x, x.new_zeros(())), valid

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        x, valid = self._inputs(batch)
        out = self.sae(x, valid)
        self.dead_tracker.update(out.f.detach(), valid)
        terms = self._losses(x, valid, out)
        self._record_nonfinite(x, terms)
        if self._writes_step_logs():
            self.check_finite()
            with torch.no_grad():
                l0 = (out.f[valid] > 0).float().sum(-1).mean()
                batch_fvu = fvu(x, out.x_hat, valid)
            self.log_dict({f"train/{k}": v.detach() for k, v in terms.items()}, prog_bar=False)
            self.log_dict({"train/l0": l0, "train/fvu": batch_fvu}, prog_bar=True)
            dead = self.dead_tracker.dead_mask(self.hparams.dead_after_tokens)
            self.log("train/dead_fraction", dead.float().mean())
            self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        return terms["loss"]

    def _record_nonfinite(self, x: Tensor, terms: dict[str, Tensor]) -> None:
        """Remember (on the device: no host sync per step) the first step whose loss is not finite, whether
        its batch held non-finite activations and which loss terms were not finite."""
        flags = torch.stack([~torch.isfinite(x).all(), *(~torch.isfinite(v) for v in terms.values())])
        if self._nonfinite is None or len(self._nonfinite_names) != len(terms):
            self._nonfinite = (torch.full((), -1, device=x.device), torch.zeros_like(flags))
        self._nonfinite_names = list(terms)
        step, what = self._nonfinite
        first = (step < 0) & flags[-1]  # flags[-1]: the total loss
        self._nonfinite = (torch.where(first, self.global_step, step), torch.where(first, flags, what))

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` if a training loss so far was NaN or infinite.

        Called on the steps that are logged, before every checkpoint is written and at the end of
        training: a checkpoint or an exported SAE never holds weights trained on a non-finite loss.
        With several ranks the decision is collective (every rank calls this at the same points), so all
        of them stop together instead of leaving the others waiting in a collective.
        """
        local = self._nonfinite is not None and int(self._nonfinite[0]) >= 0
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            if not trainer.strategy.reduce_boolean_decision(local, all=False):
                return
            if not local:
                raise NonFiniteLossError(
                    "the training loss was not finite on another rank (its message names the step and the "
                    "cause); training stopped on every rank"
                )
        elif not local:
            return
        step, what = int(self._nonfinite[0]), self._nonfinite[1].tolist()
        terms = [n for n, bad in zip(self._nonfinite_names, what[1:], strict=True) if bad and n != "loss"]
        if what[0]:
            cause = (
                "the batch held non-finite activations at valid positions (`mtsae cache verify` and the "
                "cache build refuse them: was a shard edited, or built by an older version?)"
            )
        elif terms:
            cause = f"the loss terms {terms} were not finite with finite inputs (lower the learning rate?)"
        else:
            cause = "the sum of finite loss terms overflowed"
        raise NonFiniteLossError(
            f"the training loss was not finite at step {step}: {cause}. Training stopped; the "
            "checkpoints written before that step are kept (resume from one with --ckpt_path)"
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_finite()

    def on_validation_epoch_start(self) -> None:
        self.check_finite()

    def on_train_end(self) -> None:
        self.check_finite()

    def _writes_step_logs(self) -> bool:
        """Whether the loggers record this step (every ``trainer.log_every_n_steps``).

        The training metrics are computed and passed to ``self.log`` only then: on other steps Lightning
        would discard them, and their reductions and bookkeeping are per-step host work that a GPU-sized
        step cannot hide (``bench/bench_trainer.py`` measures it).

        Lightning's own rule, from public attributes: the step about to be counted (``global_step + 1``;
        one optimizer, so optimizer steps and logged steps agree) is a multiple of
        ``log_every_n_steps``, or training is stopping.
        """
        if self._trainer is None:
            return True
        trainer = self.trainer
        if trainer.log_every_n_steps == 0:
            return False
        return (trainer.global_step + 1) % trainer.log_every_n_steps == 0 or trainer.should_stop

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        raw = self.raw_sae
        x, valid = self._inputs(batch)
        out = self.sae(x, valid)
        self.log("val/loss", self._losses(x, valid, out)["loss"], sync_dist=True)
        self.val_metrics.update(
            raw.unscale(x), raw.unscale(out.x_hat), raw.unscale(out.f), valid
        )  # raw units

    def on_validation_epoch_end(self) -> None:
        self.log_dict({f"val/{k}": v.float() for k, v in self.val_metrics.compute().items()})
        self.val_metrics.reset()

    # ------------------------------------------------------------------ decoder norm constraint
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.sae.project_decoder_grad_()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.sae.normalize_decoder_()

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
        scheduler = None if self.lr_scheduler_factory is None else self.lr_scheduler_factory(optimizer)
        self._configured_settings = _optimizer_settings(optimizer, scheduler)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = [k for k in ("state_dict", "hyper_parameters") if k not in checkpoint]
        if missing:
            raise ResumeSettingsError(
                f"the checkpoint has no {missing}: it is not a checkpoint of an SAE training run of this project"
            )
        differ = model_settings_differ(checkpoint["hyper_parameters"], dict(self.hparams), _init_defaults())
        if differ:
            raise ResumeSettingsError(differ)

    def _check_resumed_settings(self) -> None:
        """A resumed run uses the checkpoint's optimizer and scheduler state, settings included: refuse a
        configuration that asks for other ones (it would be recorded in config.yaml but not applied)."""
        if self._configured_settings is None or not self.trainer.optimizers:
            return
        configs = self.trainer.lr_scheduler_configs
        restored = _optimizer_settings(self.trainer.optimizers[0], configs[0].scheduler if configs else None)
        want = self._configured_settings
        differ = sorted(
            k for k in set(want) | set(restored) if _plain(want.get(k)) != _plain(restored.get(k))
        )
        if differ:
            detail = "; ".join(
                f"{k}: checkpoint {restored.get(k)!r}, config {want.get(k)!r}" for k in differ[:6]
            )
            raise ResumeSettingsError(
                f"the resumed checkpoint's optimizer settings differ from this configuration's ({detail}); the "
                "checkpoint's would be used while config.yaml recorded these. Resume with the settings of the "
                "checkpoint's run (its config.yaml), or start a new run without --ckpt_path"
            )

    def on_train_start(self) -> None:
        if self.trainer.ckpt_path is not None:
            self._check_resumed_settings()
        # the schedule's length is known once the data is set up. Not in configure_optimizers: asking
        # for estimated_stepping_batches there builds the train loader before a checkpoint's loop state
        # is restored, which would lose the loader's mid-epoch position on resume.
        for config in self.trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, WarmupDecayLR) and config.scheduler.total_steps is None:
                config.scheduler.total_steps = int(self.trainer.estimated_stepping_batches)

    # ------------------------------------------------------------------ export
    def export_sae(self) -> MTSAE:
        """A copy of the SAE that acts on raw activations (the input scale folded into its biases)."""
        return self.raw_sae.folded()
