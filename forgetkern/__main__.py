from forgetkern.cli import main

raise SystemExit(main())
