from cocoon_net.cli import main

raise SystemExit(main())
