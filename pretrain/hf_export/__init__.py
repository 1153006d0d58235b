"""Modelling code bundled into Hugging Face exports of softmax1 / sink_logit models.

Stock GPT-NeoX cannot express these kernels, so ``sinklm convert`` copies
``configuration_sinklm.py`` and ``modeling_sinklm.py`` next to the weights and points ``config.json``'s
``auto_map`` at them: ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``
then runs this code, offline. The two files import only torch and transformers (never ``sinklm``)
so an export is self-contained; they are also importable from here for tests.
"""

from pathlib import Path

FILES = ("configuration_sinklm.py", "modeling_sinklm.py")
SOURCE_DIR = Path(__file__).resolve().parent
