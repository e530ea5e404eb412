"""The engine: sessions, runs and their events. Knows nothing of HTTP."""

from .agent import Agent as Agent
from .agent import AgentError as AgentError
from .agent import AgentRequest as AgentRequest
from .agent import ChatTurn as ChatTurn
from .events import CancelReason as CancelReason
from .events import RunStatus as RunStatus
from .limits import LimitExceeded as LimitExceeded
from .limits import TooManyRuns as TooManyRuns
from .limits import TooManySessions as TooManySessions
from .limits import TooManySubscribers as TooManySubscribers
from .manager import EngineConfig as EngineConfig
from .manager import SessionManager as SessionManager
from .run import Run as Run
from .session import Draining as Draining
from .session import OnConflict as OnConflict
from .session import QueueFull as QueueFull
from .session import RunInProgress as RunInProgress
from .session import Session as Session
from .session import SessionClosed as SessionClosed
from .session import SessionKey as SessionKey
