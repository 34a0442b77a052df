"""Direct preference optimisation (beta 0.1) of SmolLM2-135M-Instruct on preference pairs.

The offline default data is LLaMA-Factory's dpo_en_demo.json (300 pairs, ShareGPT style); prompt/
chosen/rejected JSONL and HH-RLHF files work with --set data.path=FILE. The reference policy is the
same network with its adapter disabled; its log-probabilities are computed once and cached.
"""

from esmfold_peft.nlp.config import base_config


def get_config():
    cfg = base_config()
    cfg.name = "nlp_dpo"
    cfg.task = "dpo"
    cfg.model.name = "smollm2"
    cfg.model.max_length = 96  # prompt (at most dpo.max_prompt_length) + response
    cfg.dpo.max_prompt_length = 48
    cfg.dpo.beta = 0.1
    cfg.data.max_train = 32
    cfg.data.max_eval = 16
    cfg.data.eval_fraction = 0.15
    cfg.adapter.rank = 4
    cfg.adapter.default_alpha_per_rank = 4.0
    cfg.optim.default_lr.lorta = 5e-3
    cfg.optim.default_lr.lora = 5e-4
    cfg.optim.default_lr.full = 5e-6
    cfg.optim.schedule = "cosine"
    cfg.train.steps = 12
    cfg.train.batch_size = 4
    cfg.train.log_every = 2
    cfg.train.ckpt_every = 6
    cfg.eval.batch_size = 8
    return cfg
