"""The nn.Modules that mirror published checkpoints, each named after what it loads: `dit` (Wan2.1 DiT) with
`nfeb` (FlashPortrait's expression blocks), `portrait_encoder`, `pdfgc/` (PD-FGC expression encoder and its face
models), `vae` (Wan2.1 VAE), `tiny_vae` (TAEHV), `clip_vision` (CLIP ViT-H/14), `text` (umT5); and the trained
`mini` preset's own `mini_vae` (small video autoencoder) and `mini_expression` (landmark expression encoder)."""
