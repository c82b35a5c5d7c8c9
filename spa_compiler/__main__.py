from spa_compiler.cli import entry

entry()
