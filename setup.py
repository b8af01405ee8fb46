"""Ships the Hydra config tree inside the package, so `pip install .` (not editable) runs.

The configs live at the repository root for readers: conf/, whose experiment/ links to the
presets experiments/*.yaml. A build copies them into the package as harness/conf/ (the
published study output under experiments/results/ stays out); harness/config.py reads the
checkout's conf/ when there is one, as under `pip install -e`, else the packaged copy."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def config_files():
    """(source file, its path inside harness/conf/) for every config file."""
    conf = ROOT / "conf"
    for path in sorted(conf.rglob("*.yaml")):
        relative = path.relative_to(conf)
        if relative.parts[0] != "experiment":  # the link to experiments/: its presets follow
            yield path, relative
    for path in sorted((ROOT / "experiments").glob("*.yaml")):
        yield path, Path("experiment") / path.name


class BuildWithConfigs(build_py):
    def run(self):
        super().run()
        if self.editable_mode:  # the editable package reads conf/ in the checkout
            return
        target = Path(self.build_lib) / "harness" / "conf"
        shutil.rmtree(target, ignore_errors=True)  # no stale file from an earlier build
        for source, relative in config_files():
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target / relative)


setup(cmdclass={"build_py": BuildWithConfigs})
