"""The shared core: what more than one role uses (docs/architecture.md). The flow-matching math and the
samplers (`flow`), the policy (`policy`: load, encode prompts, velocity, decode; `adapters`: LoRA),
weight transport (`weight_sync`), telemetry (`metrics`) and held-out sampling (`heldout`). It imports
`proto/` and itself only; every role may import it; the driver package `vgrpo/` never lives here."""
