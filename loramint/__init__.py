"""loramint: mint LoRA experts from task descriptions.

The core objects (base models, adapters, tasks) live here; the card's folders install as subpackages:
loramint.encoders, loramint.index, loramint.gen, loramint.training, loramint.runtime, loramint.service.
"""

__version__ = "0.1.0"
