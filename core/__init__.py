"""The shared core: what more than one role uses (docs/architecture.md). The flow-matching math and the
samplers (`flow`), the policy (`policy`: load, encode prompts, velocity, decode; `adapters`: LoRA),
weight transport (`weight_sync`), telemetry (`metrics`) and held-out sampling (`heldout`). It imports
`proto/` and itself only; every role may import it; the driver package `vgrpo/` never lives here."""

import logging


class _TorchvisionFallbackNotice(logging.Filter):
    """transformers 5 maps `CLIPImageProcessor` and `SiglipImageProcessor` to their PIL implementations when
    torchvision is absent (the classes those names meant before its image-processor refactor) and says so
    once per process, on every command that loads a pipeline or a CLIP reward. vgrpo installs no
    torchvision on purpose (its wheel must match torch's build exactly), so the notice asks for nothing a
    user can act on; every other transformers message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackNotice())
