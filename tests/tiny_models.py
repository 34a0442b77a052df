"""Small models of each attention family, built from configs (nothing downloaded)."""

from __future__ import annotations

import argparse

import torch


def fair_esm2(layers=2, dim=64, heads=4):
    import esm

    return esm.model.esm2.ESM2(num_layers=layers, embed_dim=dim, attention_heads=heads)


def fair_esm1b(layers=2, dim=64, heads=4):
    """ESM-1b architecture: no rotary embeddings, so fair-esm's fused attention path is eligible."""
    import esm

    alphabet = esm.data.Alphabet.from_architecture("ESM-1b")
    args = argparse.Namespace(arch="roberta_large", layers=layers, embed_dim=dim, ffn_embed_dim=2 * dim,
                              attention_heads=heads, max_positions=64, final_bias=True)
    return esm.model.esm1.ProteinBertModel(args, alphabet)


def hf_bert(layers=2, dim=32, heads=4):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=40, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=2 * dim, max_position_embeddings=64,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertModel(cfg)


def hf_roberta(layers=2, dim=32, heads=4):
    from transformers import RobertaConfig, RobertaModel

    cfg = RobertaConfig(vocab_size=40, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=2 * dim, max_position_embeddings=70,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return RobertaModel(cfg)


def hf_esm(layers=2, dim=32, heads=4):
    from transformers import EsmConfig, EsmModel

    cfg = EsmConfig(vocab_size=33, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
                    intermediate_size=4 * dim, position_embedding_type="rotary", token_dropout=False,
                    pad_token_id=1, mask_token_id=32, max_position_embeddings=64, layer_norm_eps=1e-5,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return EsmModel(cfg, add_pooling_layer=False)


def hf_llama(layers=2, dim=48, heads=6, kv_heads=2):
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(vocab_size=40, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=2 * dim, max_position_embeddings=64)
    return LlamaModel(cfg)


def tokens(batch=2, length=9, low=4, high=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (batch, length), generator=g)


def run(model, toks):
    """The model's main output tensor, whatever the family."""
    return main_output(model(toks))


def main_output(out):
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out["logits"]


FAMILIES = {
    "fair-esm": fair_esm2,
    "hf-bert": hf_bert,
    "hf-roberta": hf_roberta,
    "hf-esm": hf_esm,
    "hf-llama-gqa": hf_llama,
}
