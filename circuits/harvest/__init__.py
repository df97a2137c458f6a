"""Component statistics from one streamed pass over held-out text, and the examples artifact cut from them.

- `collect`: the pass (`harvest`) and the harvest artifact under `<run>/harvest/` (`save_harvest`, `load_harvest`);
- `accumulate`: the pass's running state, grown one row per subcomponent on its first firing;
- `stats`: `Harvest`, the result, and its per-subcomponent queries (token stats, co-firing, examples, summaries);
- `examples`: the compact examples artifact under `<run>/examples/` (`examples_from_harvest`).

The artifact's file names and format version live in `attrgraph.harvest_format`, which the graph side reads.
"""

from circuits.harvest.collect import harvest, load_harvest, save_harvest
from circuits.harvest.examples import examples_from_harvest, logit_lens
from circuits.harvest.stats import CoFiring, Example, Harvest, TokenStats

__all__ = [
    "CoFiring",
    "Example",
    "Harvest",
    "TokenStats",
    "examples_from_harvest",
    "harvest",
    "load_harvest",
    "logit_lens",
    "save_harvest",
]
