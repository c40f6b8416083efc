from llmtool.entry import main

main()
