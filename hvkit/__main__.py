from hvkit.cli import main

main()
