"""``python -m medvqa_lib reproduce ...`` — see :mod:`medvqa_lib.reproduce`."""

from medvqa_lib.reproduce import main

raise SystemExit(main())
