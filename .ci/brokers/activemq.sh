# ActiveMQ Classic (Debian's `activemq` package) for the STOMP adapter's tests: sourced by
# .ci/run, which calls `ensure_activemq`. It needs the helpers .ci/run defines (`port_open`,
# `wait_port`, `log`, `install`, `$SUDO`).
#
# A private instance, not the package's `main` one: its own configuration and kahaDB under
# $IDEM_CI_CACHE/activemq (default ~/.cache/idem-ci/activemq), OpenWire on 127.0.0.1:61616 and
# STOMP on 127.0.0.1:61613 (no clash with RabbitMQ's 5672 or Mosquitto's 1883), persistent
# messages, one dead-letter queue per queue (`DLQ.<queue>`), and the broker's stock redelivery
# behaviour (no redelivery plugin: a STOMP NACK dead-letters at once, which idem never relies
# on). The pid is kept in <that directory>/activemq.pid, so that a tool can SIGKILL the broker
# and start it again with <that directory>/start.sh (the same command as here). The Debian
# package logs through log4j 1 without a configuration: the console log says little.

activemq_dir() {
  printf '%s\n' "${IDEM_CI_CACHE:-$HOME/.cache/idem-ci}/activemq"
}

ensure_activemq() {
  port_open 61613 && return 0
  log "starting ActiveMQ (STOMP on 127.0.0.1:61613)"
  [ -f /usr/share/activemq/bin/activemq.jar ] || install activemq
  command -v java >/dev/null || install default-jre-headless
  local dir; dir=$(activemq_dir)
  mkdir -p "$dir/conf" "$dir/data" "$dir/tmp"
  if [ -f /etc/activemq/instances-available/main/log4j2.properties ]; then
    cp /etc/activemq/instances-available/main/log4j2.properties "$dir/conf/"
  fi
  activemq_write_config "$dir/conf/activemq.xml"
  activemq_write_start "$dir"
  "$dir/start.sh"
  if ! wait_port ActiveMQ 61613 60; then
    tail -n 40 "$dir/console.log" >&2 || true
    return 1
  fi
}

activemq_write_config() { # path
  cat >"$1" <<'XML'
<beans xmlns="http://www.springframework.org/schema/beans"
       xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
       xsi:schemaLocation="http://www.springframework.org/schema/beans http://www.springframework.org/schema/beans/spring-beans.xsd
                           http://activemq.apache.org/schema/core http://activemq.apache.org/schema/core/activemq-core.xsd">
  <bean class="org.springframework.beans.factory.config.PropertyPlaceholderConfigurer"/>
  <broker xmlns="http://activemq.apache.org/schema/core" brokerName="idem-ci" useJmx="false"
          persistent="true" dataDirectory="${activemq.data}" schedulerSupport="false">
    <destinationPolicy>
      <policyMap>
        <policyEntries>
          <policyEntry queue=">">
            <deadLetterStrategy>
              <individualDeadLetterStrategy queuePrefix="DLQ." useQueueForQueueMessages="true"/>
            </deadLetterStrategy>
          </policyEntry>
        </policyEntries>
      </policyMap>
    </destinationPolicy>
    <persistenceAdapter>
      <kahaDB directory="${activemq.data}/kahadb"/>
    </persistenceAdapter>
    <transportConnectors>
      <transportConnector name="openwire" uri="tcp://127.0.0.1:61616"/>
      <transportConnector name="stomp" uri="stomp://127.0.0.1:61613"/>
    </transportConnectors>
  </broker>
</beans>
XML
}

activemq_write_start() { # dir
  local dir=$1
  cat >"$dir/start.sh" <<SH
#!/usr/bin/env bash
# Starts the private ActiveMQ instance in the background; its pid goes to activemq.pid.
set -eu
B="$dir"
cd "\$B"
nohup java -Xms128M -Xmx256M \\
  --add-reads=java.xml=java.logging --add-opens java.base/java.security=ALL-UNNAMED \\
  --add-opens java.base/java.net=ALL-UNNAMED --add-opens java.base/java.lang=ALL-UNNAMED \\
  --add-opens java.base/java.util=ALL-UNNAMED --add-opens java.naming/javax.naming.spi=ALL-UNNAMED \\
  --add-opens java.base/java.util.concurrent=ALL-UNNAMED \\
  --add-opens java.base/java.util.concurrent.atomic=ALL-UNNAMED \\
  -Djava.io.tmpdir="\$B/tmp" -Dactivemq.classpath="\$B/conf" -Dactivemq.home=/usr/share/activemq \\
  -Dactivemq.base="\$B" -Dactivemq.conf="\$B/conf" -Dactivemq.data="\$B/data" \\
  -jar /usr/share/activemq/bin/activemq.jar start "xbean:file:\$B/conf/activemq.xml" \\
  >>"\$B/console.log" 2>&1 </dev/null &
echo \$! >"\$B/activemq.pid"
SH
  chmod +x "$dir/start.sh"
}
