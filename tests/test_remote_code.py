"""An architecture unmask does not know, loaded through transformers with explicit trust_remote_code."""

import json

import pytest
import torch

import unmask
from unmask.models import CheckpointError

CONFIG_PY = '''
from transformers import PretrainedConfig

class ToyConfig(PretrainedConfig):
    model_type = "toy-mdm"

    def __init__(self, vocab_size=40, hidden=16, mask_token_id=39, **kwargs):
        self.vocab_size, self.hidden, self.mask_token_id = vocab_size, hidden, mask_token_id
        super().__init__(**kwargs)
'''

MODELING_PY = '''
import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput
from .configuration_toy import ToyConfig

class ToyModel(PreTrainedModel):
    config_class = ToyConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden)
        self.head = torch.nn.Linear(config.hidden, config.vocab_size)
        self.post_init()

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        return MaskedLMOutput(logits=self.head(h + h.mean(1, keepdim=True)))
'''


@pytest.fixture
def remote_code_dir(tmp_path):
    (tmp_path / "configuration_toy.py").write_text(CONFIG_PY)
    (tmp_path / "modeling_toy.py").write_text(MODELING_PY)
    config = {"model_type": "toy-mdm", "vocab_size": 40, "hidden": 16, "mask_token_id": 39,
              "architectures": ["ToyModel"],
              "auto_map": {"AutoConfig": "configuration_toy.ToyConfig", "AutoModel": "modeling_toy.ToyModel"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file({"embed.weight": torch.randn(40, 16), "head.weight": torch.randn(40, 16), "head.bias": torch.zeros(40)},
              tmp_path / "model.safetensors")
    return tmp_path


def test_unknown_architecture_needs_the_opt_in(remote_code_dir):
    with pytest.raises(CheckpointError, match="trust-remote-code"):
        unmask.load_model(remote_code_dir)


def test_remote_code_model_samples_with_cfg(remote_code_dir):
    model = unmask.load_model(remote_code_dir, trust_remote_code=True)
    out = unmask.generate(model, torch.tensor([[1, 2, 3]]), steps=4, gen_length=8, block_length=4, cfg_scale=1.0)
    assert out.shape == (1, 11) and not (out == 39).any()
    with pytest.raises(ValueError, match="cache= needs unmask's own model"):
        unmask.generate(model, torch.tensor([[1, 2, 3]]), steps=4, gen_length=8, block_length=4, cache="dual")
