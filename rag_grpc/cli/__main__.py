"""``python -m rag_grpc.cli``, as the ``rag-grpc`` command."""

import sys

from rag_grpc.cli import main

sys.exit(main())
