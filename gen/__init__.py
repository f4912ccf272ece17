"""The generator (issue 4): a conditional VAE mapping description embeddings + retrieved-expert priors to LoRA weights."""
