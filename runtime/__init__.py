"""The MoE runtime (issue 5): experts stacked on the device, routed per token or per request, mixed batches."""
