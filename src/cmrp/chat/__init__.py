"""Talking to a customized character: multi-turn sessions (`cmrp chat`) and shareable character artefacts.

Modules import torch / peft inside their functions, so importing this package stays light.
- `session`: `ChatSession` (history, text reply, optional image per turn, transcript).
- `artefact`: `save_character` / `load_character` (adapter in PEFT format + character card) and
  `CharacterPool` (several LoRA characters on one base model, switched per request).
- `commands`: the `cmrp chat` sub-command.
"""

__all__: list[str] = []
