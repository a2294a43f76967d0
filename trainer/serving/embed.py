"""Embedding vectors from the served causal LM: the final hidden states of an input's tokens, pooled
("mean": averaged over the tokens; "last": the last token's), in float32. Rows are run together,
right-padded with an attention mask, on the worker thread (trainer/serving/worker.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

POOLINGS = ("mean", "last")


@dataclass
class EmbeddingRow:
    ids: list[int]
    pooling: str  # one of POOLINGS


def final_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, tokens, hidden): what the LM head reads, i.e. `output_hidden_states`' last entry.
    The transformer body alone (`base_model`) gives it without the vocabulary-wide logits."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel's own model
    body = getattr(lm, "base_model", lm)
    if body is not lm:
        return body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return lm(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True
    ).hidden_states[-1]


@torch.no_grad()
def embed_rows(model, rows: list[EmbeddingRow], pad_id: int = 0) -> list[np.ndarray]:
    """One float32 vector per row. Right padding: a row's positions are those it has alone, and
    causal attention keeps its tokens from seeing the padding after them."""
    device = next(model.parameters()).device
    width = max(len(row.ids) for row in rows)
    input_ids = torch.tensor([row.ids + [pad_id] * (width - len(row.ids)) for row in rows], device=device)
    attention_mask = torch.tensor([[1] * len(row.ids) + [0] * (width - len(row.ids)) for row in rows], device=device)
    hidden = final_hidden_states(model, input_ids, attention_mask).float()
    vectors = [
        hidden[i, : len(row.ids)].mean(dim=0) if row.pooling == "mean" else hidden[i, len(row.ids) - 1]
        for i, row in enumerate(rows)
    ]
    return list(torch.stack(vectors).cpu().numpy())  # GPU->CPU sync, once per batch
