from rtserver.cli import main

main()
