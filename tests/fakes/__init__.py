"""Fakes for tests and benchmarks: real servers on loopback.

The public names live in :mod:`tests.fakes.upstream` and are re-exported
here; the implementation is in the private modules next to it.
"""

from ._directives import DirectiveError as DirectiveError
from ._directives import Directives as Directives
from ._directives import parse_directives as parse_directives
from ._registry import RequestRecord as RequestRecord
from ._registry import SessionStats as SessionStats
from ._server import FakeUpstream as FakeUpstream
from ._server import open_fake_upstream as open_fake_upstream
from ._wire import token_text as token_text
