from dreambooth.cli import main

raise SystemExit(main())
