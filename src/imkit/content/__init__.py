"""
Content security: checkers that judge messages before they are stored.

A checker is ``checker(context, item)`` returning None (allow), ``allow()``, ``flag(reason)`` or
``reject(reason)``, or a Deferred or coroutine of one.  Register it on a hub::

    from imkit.content import flag, reject

    def no_shouting(context, item):
        if item.content_type.startswith("text/") and item.body.isupper():
            return flag("shouting")

    hub.content.add(no_shouting)
    hub.content.on_flagged.append(lambda report: forward(report.line()))

or with ``twistd imkit --content-check mymodule:no_shouting``.  ``imkit.content.pipeline``
describes how verdicts combine, ``imkit.content.urls`` the URL extractor and
``imkit.content.blocklist`` the phishing-link checker (``--blocklist FILE``).
"""

from imkit.checks import ALLOW, Action, CheckContext, ContentChecker, Rejected, Verdict, allow, flag, reject, worst
from imkit.content.blocklist import Blocklist, BlocklistError, BlocklistFile, PhishingChecker, parse_entry
from imkit.content.pipeline import (
    ERROR_REASON,
    FLAGGED_FORMAT,
    REJECTED_FORMAT,
    ContentCheckError,
    ContentPipeline,
    FlagReport,
    checker_name,
    load_checkers,
    threaded,
)
from imkit.content.urls import URL, extract_urls, normalise_host

__all__ = [
    "ALLOW",
    "ERROR_REASON",
    "FLAGGED_FORMAT",
    "REJECTED_FORMAT",
    "URL",
    "Action",
    "Blocklist",
    "BlocklistError",
    "BlocklistFile",
    "CheckContext",
    "ContentCheckError",
    "ContentChecker",
    "ContentPipeline",
    "FlagReport",
    "PhishingChecker",
    "Rejected",
    "Verdict",
    "allow",
    "checker_name",
    "extract_urls",
    "flag",
    "load_checkers",
    "normalise_host",
    "parse_entry",
    "reject",
    "threaded",
    "worst",
]
