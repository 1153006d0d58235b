from sinklm.cli import main

raise SystemExit(main())
