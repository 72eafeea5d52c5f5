"""Sampling from a trained model."""

from __future__ import annotations

import torch

from xlab.errors import XLabError


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    output_length: int,
    block_size: int,
    eos_class: int | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Multinomial sampling of up to `output_length` new tokens after the 1-D prompt `inputs`.

    The model sees at most the last `block_size` tokens. Sampling stops at `eos_class` (not included in the result).
    `temperature=0` picks the most likely token. Returns the new token ids.
    """
    if inputs.dim() != 1 or inputs.numel() == 0:
        raise XLabError("inputs must be a non-empty 1-D tensor of token ids")
    if temperature < 0:
        raise XLabError(f"temperature={temperature} must be >= 0")
    if output_length < 0:
        raise XLabError(f"output_length={output_length} must be >= 0")
    tokens = inputs.clone()
    out: list[int] = []
    for _ in range(output_length):
        logits = model(tokens[-block_size:].unsqueeze(0))[0, -1].float()
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = int(torch.multinomial(probs.cpu(), 1, generator=generator))
        if nxt == eos_class:
            break
        out.append(nxt)
        tokens = torch.cat([tokens, torch.tensor([nxt], device=tokens.device)])
    return out
