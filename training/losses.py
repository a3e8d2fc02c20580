"""Losses on padded batches: answer-only token log-probabilities and the DPO objective."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from training.render import IGNORE_INDEX, Tokenized


def collate(
    items: Sequence[Tokenized], pad_id: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` tensors."""
    width = max(len(item.input_ids) for item in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        ids[row, :n] = torch.tensor(item.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(item.labels)
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "labels": labels.to(device),
    }


def token_losses(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood of the labels and the mask of supervised tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    nll = F.cross_entropy(
        logits.reshape(-1, logits.size(-1)),
        labels.clamp(min=0).reshape(-1),
        reduction="none",
    ).view(labels.shape)
    return nll * mask, mask


def mean_answer_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy averaged over the batch's supervised tokens."""
    nll, mask = token_losses(model, batch)
    return nll.sum() / mask.sum().clamp(min=1)


def sequence_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probability of each row's answer tokens."""
    nll, _ = token_losses(model, batch)
    return -nll.sum(dim=1)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean DPO loss (Rafailov et al. 2023) and the share of pairs ranked correctly."""
    margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    loss = -F.logsigmoid(beta * margin).mean()
    return loss, (margin > 0).float().mean()
