"""Core ML export of S2DiT for iPhone (docs/architecture.md, "Core ML export").

- emit.py: MIL builder emitters, one per S2DiT module, from the model's own weights;
- vae.py: the streaming VAE decoder emitters (patch VAE; dispatch to wan_vae.py for the Wan VAE,
  whose package has functions `first` and `decode`);
- export.py: packages (multifunction DiT: denoise/write; VAE decoder) + manifest.json;
- interpret.py: numpy interpreter of the saved packages (verification without Core ML);
- check.py: structural checks of saved packages; verify.py: MLX vs package streaming loops;
- cli.py: `s2dit export coreml`.

coremltools is optional (the `coreml` extra): nothing here imports it until used.
"""
