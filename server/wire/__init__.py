"""Wire encoders: pure functions and small stateful encoders from run events
to bytes. No I/O, no event loop: testable on their own."""

from .formats import FrameEncoder as FrameEncoder
from .formats import NativeNdjsonEncoder as NativeNdjsonEncoder
from .formats import NativeSseEncoder as NativeSseEncoder
from .formats import OpenAIChunkEncoder as OpenAIChunkEncoder
from .formats import StreamDropped as StreamDropped
