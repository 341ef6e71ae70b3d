from embedpin.cli import main

raise SystemExit(main())
