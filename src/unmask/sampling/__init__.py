"""Sampling from masked diffusion LMs: schedule, proposals, remasking rules, guidance, block loop."""

from .blocks import block_generate, is_block_diffusion
from .generate import GenerationOutput, StepState, generate, left_pad
from .guidance import Guidance, guided_logits, mix_guidance, unconditional_canvas
from .noise import propose_tokens
from .options import OptionError, SamplerOptions, check_seed, context_length
from .remasking import REMASKING_RULES, parallel_counts, select_top, token_confidence
from .schedule import block_length_for, transfer_schedule

__all__ = [
    "GenerationOutput", "StepState", "generate", "block_generate", "is_block_diffusion", "left_pad", "SamplerOptions", "OptionError", "check_seed",
    "context_length", "Guidance", "guided_logits",
    "mix_guidance", "unconditional_canvas", "propose_tokens", "REMASKING_RULES", "parallel_counts", "select_top",
    "token_confidence", "transfer_schedule", "block_length_for",
]
