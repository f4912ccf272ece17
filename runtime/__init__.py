"""The MoE runtime: experts stacked on the device, routed per token or per request, mixed batches."""
