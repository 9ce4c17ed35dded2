"""Train an SAE with LightningCLI: ``python train.py fit --config configs/demo.yaml``."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from data import ActivationDataModule
from mtsae import SAEModule


class MTSAECLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # the data decides the activation width; it is never typed twice
        parser.link_arguments("data.d_in", "model.d_in", apply_on="instantiate")


def cli_main(args: list[str] | None = None, run: bool = True) -> MTSAECLI:
    """Entry point that tests can call: ``cli_main(["fit", "--config", "configs/demo.yaml"])``."""
    return MTSAECLI(
        SAEModule,
        ActivationDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    cli_main()
