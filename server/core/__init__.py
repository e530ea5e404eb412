"""The engine: sessions, runs and their events. Knows nothing of HTTP."""

from .agent import Agent as Agent
from .agent import AgentRequest as AgentRequest
from .agent import ChatTurn as ChatTurn
from .config import EngineConfig as EngineConfig
from .errors import AgentError as AgentError
from .errors import CoordinatorUnavailable as CoordinatorUnavailable
from .errors import Draining as Draining
from .errors import LifecycleError as LifecycleError
from .errors import LimitExceeded as LimitExceeded
from .errors import ObserverError as ObserverError
from .errors import QueueFull as QueueFull
from .errors import RunInProgress as RunInProgress
from .errors import SessionClosed as SessionClosed
from .errors import TooManyRuns as TooManyRuns
from .errors import TooManySessions as TooManySessions
from .errors import TooManySubscribers as TooManySubscribers
from .events import CancelReason as CancelReason
from .events import RunStatus as RunStatus
from .manager import SessionManager as SessionManager
from .result import RunResult as RunResult
from .run import Run as Run
from .session import OnConflict as OnConflict
from .session import Session as Session
from .session import SessionKey as SessionKey
