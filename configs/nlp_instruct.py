"""Instruction tuning: SmolLM2-135M-Instruct (Llama, 9 query / 3 key-value heads) on Alpaca-format data.

The offline default data is LLaMA-Factory's alpaca_en_demo.json (999 examples); any Alpaca JSON
file works with --set data.path=FILE. Loss on response tokens only; the model's chat template
formats prompts (the Alpaca template when the tokenizer has none). A few minutes on 2 CPU cores.
"""

from esmfold_peft.nlp.config import base_config


def get_config():
    cfg = base_config()
    cfg.name = "nlp_instruct"
    cfg.task = "alpaca"
    cfg.model.name = "smollm2"
    cfg.model.max_length = 128
    cfg.data.max_train = 400
    cfg.data.max_eval = 16
    cfg.data.eval_fraction = 0.1
    cfg.adapter.rank = 4
    cfg.adapter.default_alpha_per_rank = 4.0  # paper D.2: alpha 16 at these ranks
    cfg.optim.default_lr.lorta = 1e-2  # paper D.2
    cfg.optim.default_lr.lora = 1e-3
    cfg.optim.default_lr.full = 2e-5
    cfg.optim.schedule = "cosine"  # paper D.2
    cfg.optim.weight_decay = 0.01
    cfg.train.steps = 16
    cfg.train.batch_size = 4
    cfg.train.log_every = 2
    cfg.train.ckpt_every = 8
    cfg.eval.batch_size = 8
    cfg.eval.generations = 2
    cfg.eval.max_new_tokens = 32
    return cfg
