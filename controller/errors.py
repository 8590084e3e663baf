"""The controller's error tree; ``berth.controller.api`` maps each to one gRPC status code.

- ``ClusterError``          base; ``str(err)`` is a one-line message for the user
  - ``NotFoundError``       the named service or node does not exist
  - ``AlreadyExistsError``  a create found the name taken
  - ``InvalidError``        a spec or argument is invalid (message names the field)
  - ``FailedPreconditionError``  the request conflicts with current state
  - ``UnavailableError``    etcd is unreachable; retryable, nothing was changed
"""

from __future__ import annotations


class ClusterError(Exception):
    retryable = False


class NotFoundError(ClusterError):
    pass


class AlreadyExistsError(ClusterError):
    pass


class InvalidError(ClusterError):
    pass


class FailedPreconditionError(ClusterError):
    pass


class UnavailableError(ClusterError):
    retryable = True
