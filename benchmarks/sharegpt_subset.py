"""Write the part of the packaged ShareGPT file that a study uses, as a compact JSON array.

The packaged file is 125 MB, too large to carry to a machine that takes 64 MiB per call. A study
with `data.max_examples=N` uses the first N usable conversations, so the records up to the last
one it uses, in the same format and order, give it the same conversations with the same ids and
the same split (harness/data/sharegpt.py: write_prefix).

    python benchmarks/sharegpt_subset.py OUT.json [overrides, default: +experiment=sharegpt_smollm2]
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from harness.data import sharegpt
from harness.config import CONF_DIR, CONFIG_NAME
from harness.data.sources import load_source


def main(out: str, overrides: list[str]) -> None:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(CONFIG_NAME, overrides=overrides or ["+experiment=sharegpt_smollm2"])
    if cfg.data.kind != "sharegpt" or cfg.data.path:
        sys.exit("error: the config must read the packaged ShareGPT file (data=sharegpt, data.path=null)")
    source = load_source(cfg.data)
    last = max(list(source.train["row"]) + list(source.val["row"]))
    size = sharegpt.write_prefix(sharegpt.packaged_file(), Path(out), last)
    print(f"{out}: records 0..{last} of the packaged file ({len(source.train)} train and {len(source.val)} "
          f"validation conversations), {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
