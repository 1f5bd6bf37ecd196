"""What `explain`, `evaluate`, `heatmap` and `report` share after their options: the explainer and
target set checked and opened (:class:`SessionOptions`), and the explanation saved the way
`lavise explain` saves it (:func:`explanation`, over :func:`lavise_cli.methods.saved_explanation`), so that the commands differ only in what they show.

Typer needs each command's parameters spelled out (their declarations are the shared constants of
:mod:`.options`); what the commands do with them is here, once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from .common import state, warn_trained_on

if TYPE_CHECKING:
    from ..embeddings import Vocabulary
    from ..session import Session

# The library is imported inside the functions (at their first call): the command modules import
# no torch when they load, so `lavise --version`, `--help` and `lavise store` start fast.


@dataclass(frozen=True)
class SessionOptions:
    """A command's options that pick the explainer, its target set, the filters and the vocabulary,
    and run the target pass (named as the commands' parameters; ``model``/``layer`` only check the
    explainer, as `explain`'s and `evaluate`'s --model/--layer)."""

    explainer: Optional[str]
    filters: Optional[str]
    all_filters: bool
    dataset: Sequence[str]
    split: Optional[str]
    image_dir: Optional[Path]
    vocab: str
    vocab_size: Optional[int]
    device: str
    batch_size: int
    precision: str
    retrieval: str
    rank: str
    model: Optional[str] = None
    layer: Optional[str] = None

    def check(self) -> None:
        """What can be checked before the (possibly long) target pass: --retrieval and --rank, and
        --filters against the explainer."""
        from ..methods import check_word_settings
        from ..session import check_filters

        check_word_settings(self.retrieval, self.rank)
        check_filters(state.store, self.explainer, self.filters, self.all_filters)

    def open(self, prog: Any) -> tuple[Session, list[int], Vocabulary]:
        """The session (its target pass run, or read from the cache) with the warning when it shares
        images with the explainer's training images; the chosen filters; the vocabulary."""
        from ..explain import parse_filters
        from ..session import open_session, vocabulary_for

        ses = open_session(state.store, self.explainer, datasets=self.dataset, split=self.split, images=self.image_dir,
                           model=self.model, layer=self.layer, device=self.device, batch_size=self.batch_size,
                           precision=self.precision, progress=prog)
        warn_trained_on(ses)
        chosen = parse_filters(self.filters, ses.cache.shape[0], self.all_filters)
        return ses, chosen, vocabulary_for(ses, self.vocab, self.vocab_size)


def explanation(opts: SessionOptions, ses: Session, chosen: list[int], voc: Vocabulary, method: str, *, p: int,
                s: int, k: int, prog: Any, reuse: bool = False) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """:func:`lavise_cli.methods.saved_explanation` with the command's word settings."""
    from ..methods import saved_explanation

    return saved_explanation(ses, chosen, voc, method, p=p, s=s, k=k, retrieval=opts.retrieval, rank=opts.rank,
                             progress=prog, reuse=reuse)
