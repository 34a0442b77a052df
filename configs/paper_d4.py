"""The paper's folding experiment (LoRTA App. D.4): 12 trunk blocks, ESM-2 35M, AF2 recipe.

c_s 1024, c_z 128, crop 256, effective batch 32, 850,000 steps, Adam 1e-3 with 1k warm-up and
×0.95 every 50k after 50k, clipping 0.1, EMA 0.999, recycles 0..3, bf16 on GPU. Data: OpenFold's
training layout (set data.mmcif_dir, data.chain_data_cache and the validation pair).
A GPU job: on CPU use it only to measure step cost (e.g. --set train.crop_size=64).
"""

from esmfold_peft.fold.run.config import base_config, structure_module_config, trunk_config


def get_config():
    cfg = base_config()
    cfg.name = "paper_d4"
    cfg.model.lm.name = "esm2_t12_35M_UR50D"
    cfg.model.trunk = trunk_config(num_blocks=12, c_s=1024, c_z=128,
                                   structure_module=structure_module_config(c_s=384, c_z=128))
    cfg.model.checkpoint_blocks = True
    cfg.optim.ema_decay = 0.999
    cfg.train.steps = 850_000
    cfg.train.crop_size = 256
    cfg.train.batch_size = 1
    cfg.train.effective_batch_size = 32
    cfg.train.max_recycles = 3
    cfg.train.log_every = 100
    cfg.train.val_every = 10_000
    cfg.train.ckpt_every = 2_000
    cfg.data.source = "openfold"
    cfg.data.val_max_length = 700
    return cfg
