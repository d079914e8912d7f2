"""A fixed English stopword list for the content-word metrics (:mod:`trainer.metrics`).

Written for NeuroLens, not copied from a library, so that a report's content-word scores never
change with a dependency's version. The words are the closed classes of English grammar, as
any grammar lists them (e.g. Quirk et al. 1985, *A Comprehensive Grammar of the English
Language*, chapters on determiners, pronouns, prepositions, conjunctions and auxiliaries):
articles and determiners, personal, possessive, reflexive, demonstrative and relative
pronouns, the common prepositions and conjunctions, the forms of *be*, *have* and *do*, the
modal verbs, and a few very frequent adverbs of degree and negation. Content words (nouns,
lexical verbs, adjectives, most adverbs) are what is left. Contractions are listed without the
apostrophe's second half only where a whitespace tokenizer would leave them whole.
"""

from __future__ import annotations

STOPWORDS: frozenset[str] = frozenset("""
a an the this that these those some any each every either neither no all both few many much more most
other another such what which whose whoever whatever whichever
i me my mine myself we us our ours ourselves you your yours yourself yourselves he him his himself
she her hers herself it its itself they them their theirs themselves one ones who whom
about above across after against along among around as at before behind below beneath beside
between beyond by down during except for from in inside into like near of off on onto out outside
over past since through throughout till to toward towards under until up upon with within without
and but or nor so yet if then than because while whereas although though unless whether
be am is are was were been being have has had having do does did doing done
can could may might must shall should will would ought
not never very too also just only even still quite rather here there when where why how now
s t don't doesn't isn't aren't wasn't weren't can't won't
""".split())
"""186 function words, lower case (the metrics lower-case before looking words up)."""


def content_words(text: str) -> str:
    """``text`` with every stopword removed (whitespace tokens, compared lower-cased)."""
    return " ".join(w for w in text.split() if w.lower() not in STOPWORDS)
