"""DeepSeek-V3's multi-token-prediction (MTP) layer: the checkpoint's layer num_hidden_layers
(``num_nextn_predict_layers`` = 1 in V3, V3.2), which drafts the token after next.

At position i it takes the main model's final hidden state h_i (after model.norm) and the
embedding of the next token t_{i+1}, and predicts t_{i+2}:

    x = eh_proj([enorm(embed_tokens(t_{i+1})), hnorm(h_i)])     # the order of the published
    x = decoder_layer(x)                                        # eh_proj, as vLLM and SGLang
    g_i = shared_head.norm(x);  logits = shared_head.head(g_i)  # read it; the paper writes
                                                                # [h; emb]
at rotary position i, with its own attention over the MTP rows of positions 0..i (its own
latent cache). Drafting k > 1 tokens feeds g_i back in place of the main model's h_{i+1}, as
vLLM's MTP proposer does; DeepSeek trained one depth, so drafts past the first are weaker.
Parameter names are the checkpoint's (model.layers.61.enorm, ..., shared_head.head); the layer
is a DecoderLayer (self_attn, mlp, its norms) with those parts added. Its embed_tokens and
shared_head.head are copies of the main model's in DeepSeek's files; from_pretrained fills them
from the main model's where a checkpoint leaves them out.
"""

import torch
from torch import nn

from ds_model.model import DecoderLayer, RMSNorm


class SharedHead(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


class MTPLayer(DecoderLayer):
    def __init__(self, config, layer_idx: int, ep: dict):
        super().__init__(config, layer_idx, ep)
        H = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, H)
        self.enorm = RMSNorm(H, config.rms_norm_eps)
        self.hnorm = RMSNorm(H, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * H, H, bias=False)
        self.shared_head = SharedHead(config)

    def draft(self, input_ids, hidden, cos, sin, batch, kv_cache, index_cache=None):
        """(g [T, H], logits [T, V]): for each row, the next token input_ids [T] and the hidden
        state [T, H] before it; g is what a further draft step takes as hidden."""
        x = torch.cat([self.enorm(self.embed_tokens(input_ids)), self.hnorm(hidden)], dim=-1)
        x = super().forward(self.eh_proj(x), cos, sin, batch, kv_cache, index_cache)
        g = self.shared_head.norm(x)                                     # [T, H]
        return g, self.shared_head.head(g)
