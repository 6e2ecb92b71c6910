"""Sampling from masked diffusion LMs: schedule, proposals, remasking rules, guidance, block loop."""

from .generate import GenerationOutput, StepState, generate, left_pad, validate_request
from .guidance import guided_logits, mix_guidance, unconditional_canvas
from .noise import propose_tokens
from .remasking import REMASKING_RULES, parallel_counts, select_top, token_confidence
from .schedule import block_length_for, transfer_schedule

__all__ = [
    "GenerationOutput", "StepState", "generate", "left_pad", "validate_request", "guided_logits",
    "mix_guidance", "unconditional_canvas", "propose_tokens", "REMASKING_RULES", "parallel_counts", "select_top",
    "token_confidence", "transfer_schedule", "block_length_for",
]
