"""The NLP harness: the adapter core, unchanged, on text transformers (paper §4.1–4.3).

* classification (GLUE and offline stand-ins) with an encoder and a trained head: `glue`, `tasks`;
* instruction tuning of a causal LM, loss on response tokens only: `instruct`;
* direct preference optimisation with the adapter-disabled network as reference: `preference`;
* one training loop on the shared run contract (`train`), configs (`config`), offline data and
  weights from the package registry (`sources`), networks and adapters (`models`), figures (`plots`).

Imports the adapter core and the runtime, never the folding application.
"""
